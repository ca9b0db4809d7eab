"use strict";
// The job page: follows its job's events and shows them.
// What the gateway put on the page: no inline script, so the CSP can refuse every inline one.
const jobId = document.body.dataset.jobId;
const eventsExpired = document.body.dataset.eventsExpired === "true";
// A token for this job's stream alone (the gateway mints it; empty when tokens are off).
const streamToken = document.body.dataset.streamToken || "";
const cards = new Map();
const state = { done: 0, failed: 0, retries: 0, total: null, cost: 0 };
const $ = (id) => document.getElementById(id);

function card(kind, id, position) {
  const key = kind + "_" + id;
  if (cards.has(key)) return cards.get(key);
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.testid = "card";
  el.dataset.image = key;
  el.innerHTML = '<div class="thumb">waiting</div><div class="meta"><span class="kind"></span>' +
    '<span class="name"></span><span class="badges"></span><span class="reason"></span>' +
    '<span class="figures"></span></div>';
  el.querySelector(".kind").textContent = kind;
  el.querySelector(".name").textContent = id;
  if (position) el.style.order = position;  // the plan's order, whatever order events come in
  $("cards").appendChild(el);
  const entry = { el, key, attempts: 1 };
  cards.set(key, entry);
  return entry;
}

function badge(entry, cls, text) {
  const b = document.createElement("span");
  b.className = "badge " + cls;
  b.dataset.testid = cls + "-badge";
  b.textContent = text;
  entry.el.querySelector(".badges").appendChild(b);
}

function costRow(entry, time, cost) {
  const row = document.createElement("tr");
  for (const [text, cls] of [[entry.key, ""], [String(entry.attempts), ""],
                             [time, ""], ["$" + cost, "num"]]) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }
  $("costs").querySelector("tbody").appendChild(row);
}

function render() {
  $("done").textContent = state.done;
  $("failed").textContent = state.failed;
  $("retries").textContent = state.retries;
  $("total").textContent = state.total ?? "?";
  $("cost").textContent = "$" + (Math.round(state.cost * 1e7) / 1e7);
}

function notice(text) {
  const box = $("notice");
  box.style.display = "block";
  box.textContent = text;
}

// A local store without LOCAL_STORAGE_PUBLIC_URL makes file:// links, which a browser will
// not load from a web page: say how to fix it rather than show broken images.
function storageHint() {
  const box = $("storage-hint");
  if (box.dataset.shown) return;
  box.dataset.shown = "true";
  box.style.display = "block";
  box.textContent = "The workers store images as file:// links, which a browser does not " +
    "load from a web page. Set LOCAL_STORAGE_PUBLIC_URL=" + location.origin + " (this " +
    "gateway's address, as browsers reach it) on the workers: new images then link to " +
    "this gateway's /files/.";
}

function setStatus(text, cls) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (cls || "");
}

const handlers = {
  stage_update(d) {
    if (d.status === "started") {
      state.total = d.total_images ?? state.total;
      setStatus("running");
      return;
    }
    state.total = d.total_images || state.total;
    state.cost = Number(d.total_cost);
    $("time").textContent = d.total_time + " s";
    $("progress").style.width = "100%";
    const labels = { success: "success", partial: "partial", text_only: "text-only",
                     invalid: "invalid plan", refused: "refused", cancelled: "cancelled" };
    setStatus(labels[d.result_status] || d.status, d.result_status);
    if (d.status === "cancelled") {
      const box = $("message");
      box.style.display = "block";
      box.textContent = "Cancelled: " + (d.reason || "no reason given") + ". " +
        d.successful_images + " of " + d.total_images + " images were made before it; " +
        "the result is null.";
    }
  },
  reference_generation_start(d) {
    state.total = d.total_images;
    const entry = card(d.image_type, d.image_id, d.current_image);
    entry.el.style.order = d.current_image;
    entry.el.querySelector(".thumb").textContent = "generating…";
  },
  reference_generation_retry(d) {
    state.retries += 1;
    const entry = card(d.image_type, d.image_id);
    entry.attempts += 1;
    badge(entry, "retry", "retry " + d.retry_count + "/" + d.max_retries);
    entry.el.querySelector(".reason").textContent = d.reason;
  },
  reference_generation_complete(d) {
    state.done += 1;
    state.cost += Number(d.cost);
    const entry = card(d.image_type, d.image_id);
    const thumb = entry.el.querySelector(".thumb");
    if (String(d.image_url).startsWith("file:")) {
      thumb.textContent = "stored on the worker (file://)";
      storageHint();
    } else {
      const img = document.createElement("img");
      img.src = d.image_url;
      img.alt = d.image_type + " " + d.image_id;
      img.dataset.testid = "image";
      thumb.textContent = "";
      thumb.appendChild(img);
    }
    badge(entry, "done", "done");
    entry.el.querySelector(".reason").textContent = "";
    entry.el.querySelector(".figures").textContent = d.generation_time + " s · $" + d.cost;
    costRow(entry, d.generation_time + " s", d.cost);
  },
  reference_generation_failed(d) {
    state.failed += 1;
    const entry = card(d.image_type, d.image_id);
    entry.el.querySelector(".thumb").textContent = "no image";
    badge(entry, "failed", "failed");
    const reason = entry.el.querySelector(".reason");
    reason.textContent = d.reason;
    reason.dataset.testid = "failure-reason";
    costRow(entry, "–", "0");
  },
  progress(d) { $("progress").style.width = d.progress + "%"; },
  error(d) {
    const box = $("message");
    box.style.display = "block";
    box.textContent = d.reason + (d.message ? " " + d.message : "");
  },
};

// Whether the stream's token (a JWT: its middle part is base64url JSON) has expired.
function tokenExpired() {
  if (!streamToken) return false;
  try {
    const part = streamToken.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part)).exp;
    return typeof exp === "number" && exp * 1000 <= Date.now();
  } catch (e) {
    return false;
  }
}

// The last event shown: after a refusal (503, a full gateway) the page opens a new stream
// from there; the browser itself only reconnects after a stream that ended or broke.
let lastEventId = null;

function follow() {
  const query = new URLSearchParams();
  if (streamToken) query.set("token", streamToken);
  if (lastEventId) query.set("after", lastEventId);
  let address = "/jobs/" + encodeURIComponent(jobId) + "/events";
  if (query.toString()) address += "?" + query.toString();
  const source = new EventSource(address);
  source.onopen = () => {
    if (!document.body.dataset.finished && state.total !== null) setStatus("running");
  };
  source.onmessage = (e) => {
    if (e.lastEventId) lastEventId = e.lastEventId;
    const message = JSON.parse(e.data);
    (handlers[message.event_type] || (() => {}))(message.data);
    render();
    const d = message.data;
    if (message.event_type === "stage_update" && d.status !== "started") {
      source.close();
      document.body.dataset.finished = "true";
    }
  };
  // The browser reconnects by itself (sending Last-Event-ID) unless the gateway refused.
  source.onerror = () => {
    if (document.body.dataset.finished) return;
    if (source.readyState === EventSource.CLOSED) {
      if (tokenExpired()) {
        // Refused for good: its token has expired. Retrying would only be refused again.
        setStatus("disconnected");
        notice("This page's link has expired: open the job again from where you found it.");
        return;
      }
      // Refused (a busy gateway answers 503 with Retry-After, which EventSource cannot
      // read): try again in 5-15 s, spread so that a crowd does not come back at once.
      setStatus("reconnecting…");
      notice("The gateway is busy; trying again shortly.");
      setTimeout(follow, 5000 + Math.random() * 10000);
    } else {
      setStatus("reconnecting…");
    }
  };
}

if (eventsExpired) {
  setStatus("expired");
  notice("This job's events have expired (they are kept for a day after its last event). " +
    "Its result is still readable by job id.");
} else {
  follow();
}
