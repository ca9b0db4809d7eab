"""A filesystem store with expiring signed links, for the demo, tests and benchmarks."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from worker import constants as c
from worker.errors import PermanentError
from worker.storage import StoredObject, check_png_size

_KEY_FILE = ".signing-key"


class LocalImageStore:
    def __init__(
        self, root: Path, bucket: str = c.DEFAULT_BUCKET, public_url: str | None = None
    ) -> None:
        self._root = root.resolve()
        self._bucket_dir = self._root / bucket
        self._public_url = public_url.rstrip("/") if public_url else None
        self._key: bytes | None = None

    @property
    def bucket_dir(self) -> Path:
        return self._bucket_dir

    def ensure_bucket(self) -> None:
        self._bucket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _file(self, path: str) -> Path:
        target = (self._bucket_dir / path).resolve()
        # Ids are validated upstream; this is the last line of defence for the filesystem.
        if not target.is_relative_to(self._bucket_dir) or target == self._bucket_dir:
            raise PermanentError(f"Refused to store outside the bucket: {path!r}")
        return target

    def put_png(self, path: str, data: bytes) -> None:
        check_png_size(data)
        target = self._file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half an image, and a re-upload replaces.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, path: str) -> bool:
        return self._file(path).is_file()

    def read(self, path: str) -> bytes:
        return self._file(path).read_bytes()

    def signed_url(self, path: str, expires_in_s: int = c.SIGNED_URL_TTL_S) -> str:
        expires = int(time.time()) + expires_in_s
        query = urlencode({"expires": expires, "signature": self.sign(path, expires)})
        if self._public_url:
            return f"{self._public_url}/files/{quote(path)}?{query}"
        return f"{self._file(path).as_uri()}?{query}"

    def sign(self, path: str, expires: int) -> str:
        message = f"{path}\n{expires}".encode()
        return hmac.new(self._signing_key(), message, hashlib.sha256).hexdigest()

    def verify(self, path: str, expires: int, signature: str) -> bool:
        """True while a link made by ``signed_url`` is unexpired and untampered. Anything
        from a stranger's query string is a no, never an error: ``compare_digest`` raises on
        a string that is not ASCII."""
        if expires < time.time() or not signature.isascii():
            return False
        return hmac.compare_digest(self.sign(path, expires), signature)

    def list_prefix(self, prefix: str) -> list[StoredObject]:
        folder = self._file(quote(prefix.strip("/"), safe="/-_"))
        if not folder.is_dir():
            return []
        found = []
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                stat = entry.stat()
                found.append(
                    StoredObject(
                        path=str(entry.relative_to(self._bucket_dir)),
                        size=stat.st_size,
                        updated_at=datetime.fromtimestamp(stat.st_mtime, UTC),
                    )
                )
        return found

    def list_job_prefixes(self) -> list[str]:
        if not self._bucket_dir.is_dir():
            return []
        return sorted(p.name for p in self._bucket_dir.iterdir() if p.is_dir())

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            self._file(path).unlink(missing_ok=True)

    def _signing_key(self) -> bytes:
        if self._key is None:
            self._key = self._load_or_create_key()
        return self._key

    def _load_or_create_key(self) -> bytes:
        key_file = self._root / _KEY_FILE
        if not key_file.exists():
            self._root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._root, prefix=".key-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
            # link() fails when the name exists: of two racing workers, one key wins whole.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, key_file)
            os.unlink(tmp)
        return key_file.read_bytes()
