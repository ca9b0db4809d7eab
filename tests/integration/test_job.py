"""Whole jobs through real worker processes and a real chord, on the local backends."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from tests.integration.conftest import DOOMED, FLAKY, REJECTED

pytestmark = pytest.mark.integration


def stored(storage_dir: Path, job_id: str) -> dict[str, Image.Image]:
    folder = storage_dir / "reference-images" / job_id
    return (
        {p.name: Image.open(io.BytesIO(p.read_bytes())) for p in sorted(folder.glob("*.png"))}
        if folder.is_dir()
        else {}
    )


def rename(plan: dict, kind: str, index: int, new_id: str) -> dict:
    plan[kind][index]["id"] = new_id
    return plan


def test_all_images_succeed(worker, run_job, load_plan, storage_dir) -> None:
    plan = load_plan("typical_2x2")
    run = run_job(plan, duration_seconds=180)

    assert run.result["status"] == "success"
    assert run.result["job_id"] == plan["job_id"]
    assert run.result["total_references"] == 4
    assert {r["scene_id"] for r in run.result["scene_references"]} == {"city_street", "rooftop"}
    assert {r["character_id"] for r in run.result["character_references"]} == {
        "protagonist",
        "antagonist",
    }
    assert run.result["total_cost"] == "0.02"

    # Order as a subscriber saw it: started first, the final stage_update last, and each
    # image announced before it completes.
    assert run.events[0] == (
        "stage_update",
        {"stage": "reference_generator", "status": "started", "total_images": 4},
    )
    final = run.events[-1][1]
    assert final["status"] == "completed" and final["successful_images"] == 4
    assert final["failed_images"] == 0 and final["total_cost"] == "0.02"
    for image in ("city_street", "rooftop", "protagonist", "antagonist"):
        start = run.events.index(
            ("reference_generation_start", run.of("reference_generation_start", image_id=image)[0])
        )
        done = run.events.index(
            (
                "reference_generation_complete",
                run.of("reference_generation_complete", image_id=image)[0],
            )
        )
        assert start < done
    completed = [d["completed_images"] for d in run.of("reference_generation_complete")]
    assert sorted(completed) == [1, 2, 3, 4]
    progress = [d["progress"] for d in run.of("progress")]
    assert progress == sorted(progress) and progress[-1] == 100
    assert not run.of("reference_generation_retry") and not run.of("reference_generation_failed")

    files = stored(storage_dir, plan["job_id"])
    assert set(files) == {
        "scene_city_street.png",
        "scene_rooftop.png",
        "character_protagonist.png",
        "character_antagonist.png",
    }
    assert all(i.format == "PNG" and i.size == (1024, 1024) for i in files.values())
    links = [r["image_url"] for r in run.result["scene_references"]]
    links += [r["image_url"] for r in run.result["character_references"]]
    assert all(link.startswith("file://") and "signature=" in link for link in links)

    # Celery logs every task's return value: the links' signatures (their credentials) are
    # redacted from those lines, the last of which is the chord's finalize.
    done = f"reference_generator.finalize[{plan['job_id']}] succeeded"
    deadline = time.monotonic() + 30
    while done not in (log := worker.log_path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done in log and "signature=[redacted]" in log
    assert not any(link.split("signature=")[1] in log for link in links)
    # LOG_FORMAT=json (the harness's): every line is one JSON object, Celery's own among them
    # (before logging starts, Python may warn in plain text that the tests run as root).
    lines = log[log.index("\n{") + 1 :].splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert "[tasks]" not in log and "[config]" not in log  # no banner
    assert any(json.loads(line).get("logger") == "celery.app.trace" for line in lines)


def test_one_of_four_fails_after_its_retry_partial(worker, run_job, load_plan, storage_dir) -> None:
    plan = rename(load_plan("typical_2x2"), "scenes", 1, DOOMED[0])
    run = run_job(plan)

    assert run.result["status"] == "partial"
    assert run.result["total_references"] == 3
    retry = run.of("reference_generation_retry", image_id=DOOMED[0])
    assert len(retry) == 1 and retry[0]["retry_count"] == 1 and retry[0]["max_retries"] == 1
    failed = run.of("reference_generation_failed", image_id=DOOMED[0])
    assert len(failed) == 1
    assert failed[0]["retry_count"] == 1 and failed[0]["will_continue"] is True
    assert "temporarily unavailable" in failed[0]["reason"]
    assert run.types.index("reference_generation_retry") < run.types.index(
        "reference_generation_failed"
    )
    final = run.events[-1][1]
    assert (final["status"], final["successful_images"], final["failed_images"]) == (
        "completed",
        3,
        1,
    )
    assert f"scene_{DOOMED[0]}.png" not in stored(storage_dir, plan["job_id"])


def test_every_scene_fails_gives_null(worker, run_job, load_plan, storage_dir) -> None:
    plan = load_plan("typical_2x2")
    rename(plan, "scenes", 0, DOOMED[0])
    rename(plan, "scenes", 1, DOOMED[1])
    run = run_job(plan)

    assert run.result is None
    assert len(run.of("reference_generation_failed")) == 2
    final = run.events[-1][1]
    assert (final["status"], final["result_status"]) == ("failed", "text_only")
    assert final["successful_images"] == 2 and final["total_cost"] == "0.01"
    # Characters were still made and stored as they finished.
    assert set(stored(storage_dir, plan["job_id"])) == {
        "character_protagonist.png",
        "character_antagonist.png",
    }


def test_retry_then_success(worker, run_job, load_plan) -> None:
    plan = rename(load_plan("typical_2x2"), "scenes", 0, FLAKY)
    run = run_job(plan)

    assert run.result["status"] == "success"
    retry = run.of("reference_generation_retry", image_id=FLAKY)
    assert len(retry) == 1 and retry[0]["retry_in_s"] == 2.0
    done = run.of("reference_generation_complete", image_id=FLAKY)
    assert len(done) == 1 and done[0]["retry_count"] == 1
    assert run.types.index("reference_generation_retry") < run.events.index(
        ("reference_generation_complete", done[0])
    )


def test_content_rejection_is_not_retried(worker, run_job, load_plan) -> None:
    plan = rename(load_plan("typical_2x2"), "scenes", 0, REJECTED)
    run = run_job(plan)

    assert run.result["status"] == "partial"
    assert not run.of("reference_generation_retry")
    failed = run.of("reference_generation_failed", image_id=REJECTED)
    assert failed[0]["retry_count"] == 0 and "content filter" in failed[0]["reason"]


def test_budget_too_small_refuses_the_job(
    worker, run_job, load_plan, storage_dir, redis_server
) -> None:
    plan = load_plan("typical_2x2")
    run = run_job(plan, duration_seconds=0.006)  # limit $0.02 < estimate $0.024

    assert run.result is None
    assert run.types == ["error", "stage_update"]
    error = run.events[0][1]
    assert error["reason"].startswith("Budget exceeded")
    assert error["estimated_cost"] == "0.024" and error["limit"] == "0.02"
    assert run.events[1][1]["status"] == "failed"
    assert stored(storage_dir, plan["job_id"]) == {}
    ledger = redis.Redis.from_url(redis_server.url, decode_responses=True).hgetall(
        f"refgen:job:{{{plan['job_id']}}}:ledger"
    )
    assert ledger.get("spent") == "0"


def test_invalid_plan_is_refused_and_the_worker_carries_on(
    worker, run_job, load_plan, storage_dir
) -> None:
    invalid = json.loads((Path(__file__).parents[1] / "data" / "invalid_plan.json").read_text())
    run = run_job(invalid, job_id="not-a-uuid")

    assert run.result is None
    assert run.types == ["error", "stage_update"]
    assert run.events[0][1]["reason"].startswith("The scene plan is invalid")
    assert any("scenes.0.id" in d for d in run.events[0][1]["details"])
    assert run.events[1][1]["result_status"] == "invalid"
    assert not (storage_dir / "reference-images" / "not-a-uuid").exists()
    assert worker.alive

    valid = run_job(load_plan("minimal_1x1"))
    assert valid.result["status"] == "success"


def readme_block(marker: str) -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_refused_job_sent_again_with_the_readmes_code_gets_its_own_result(
    worker, run_job, load_plan, client
) -> None:
    """Issue 20, item 4: the corrected re-send under the same job id, with the documented
    client code (README's block, run as it stands), reads this run's result, not the
    refusal's null."""
    plan = load_plan("minimal_1x1")
    refused = run_job(plan, duration_seconds=0.001)  # over budget
    assert refused.result is None and refused.events[-1][1]["result_status"] == "refused"
    scope: dict[str, object] = {"app": client, "plan": plan}
    exec(readme_block("resend-example"), scope)  # the README's own example
    result = scope["result"]
    assert isinstance(result, dict) and result["status"] == "success"


def test_duplicate_enqueue_runs_once(worker, run_job, load_plan, client) -> None:
    plan = load_plan("minimal_1x1")
    client.send_task("reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan})
    run = run_job(plan)  # the second enqueue of the same job id
    assert run.result["status"] == "success"
    assert client.AsyncResult(plan["job_id"]).get(timeout=10) == run.result


def test_bare_client_sends_by_name_and_reads_by_job_id(
    worker, load_plan, redis_server, tmp_path
) -> None:
    """An upstream process that cannot import this project at all."""
    plan = load_plan("minimal_1x1")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    script = textwrap.dedent(f"""
        import json, sys
        sys.path = [p for p in sys.path if "site-packages" in p or p.endswith(".zip")
                    or "lib/python" in p]
        from celery import Celery
        app = Celery(broker={redis_server.url!r}, backend={redis_server.url!r})
        app.conf.accept_content = ["json"]
        plan = json.load(open("plan.json"))
        app.send_task("reference_generator.start",
                      kwargs={{"job_id": plan["job_id"], "plan": plan,
                               "duration_seconds": 60}})
        result = app.AsyncResult(plan["job_id"]).get(timeout=60)
        assert "worker" not in sys.modules and "tasks" not in sys.modules
        print(json.dumps(result))
    """)
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["status"] == "success" and result["job_id"] == plan["job_id"]
