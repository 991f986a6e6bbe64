"""The key that signs a run's checkpoints, kept outside every run directory.

A checkpoint's checksum file (``round_NNNN.pt.json``) catches a damaged file, not a changed one:
whoever can rewrite the checkpoint can rewrite its SHA-256 too. So each digest is also signed with
HMAC-SHA256 (Python's ``hmac``) under a secret key that lives in the user's configuration folder,
not in the run directory: someone who can write the run directory but cannot read the key cannot
make a checkpoint that huscf loads.

The key file holds 32 random bytes (``secrets``), hex-encoded, readable by its owner only; it is
made on first use, atomically (two trainings starting at once end up with the same key). Where it
is: ``$HUSCF_SIGNING_KEY`` if set, else ``$XDG_CONFIG_HOME/huscf/signing.key``, else
``~/.config/huscf/signing.key``. Copy it to the machine that resumes or evaluates a run, or pass
``--allow-unsigned`` there to load checkpoints no key vouches for.

The same key also seeds what the server must not know (``derive_seed``, under its own context):
with ``federation.hide_ends`` the clients' first and last blocks start from such a seed.

What a signature binds: the checkpoint's file name (its round) and the SHA-256 of its bytes. It
does not bind the run: a checkpoint of another run signed with the same key
is accepted where it fits the model (``check_model_state`` checks names, shapes and values).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from huscf.errors import HuscfError

_CONTEXT = b"huscf checkpoint signature v1\n"


def default_key_path() -> Path:
    """``$HUSCF_SIGNING_KEY``, else the user's configuration folder."""
    if env := os.environ.get("HUSCF_SIGNING_KEY"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "huscf" / "signing.key"


class SigningKey:
    """An HMAC-SHA256 key: ``sign`` a checkpoint's digest, ``verify`` a signature, ``key_id`` to tell
    keys apart in messages (a hash of the key; it reveals nothing usable about it)."""

    def __init__(self, secret: bytes, path: Path):
        if len(secret) < 32:
            raise HuscfError(f"signing key {path} holds {len(secret)} bytes; a key has 32 or more "
                             f"(remove the file and huscf makes a new one)")
        self._secret, self.path = secret, path
        self.key_id = hashlib.sha256(b"huscf key id\n" + secret).hexdigest()[:16]
        self.made = False  # whether this process made the key file (``load(create=True)``)

    @staticmethod
    def _message(name: str, digest: str) -> bytes:
        return _CONTEXT + f"{name}\n{digest}".encode()

    def sign(self, name: str, digest: str) -> str:
        return hmac.new(self._secret, self._message(name, digest), hashlib.sha256).hexdigest()

    def verify(self, name: str, digest: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(name, digest), str(signature))

    def derive_seed(self, purpose: str) -> int:
        """A 63-bit seed for ``purpose`` that only holders of this key can compute (HMAC-SHA256 of
        the purpose, apart from every signature by its context): ``federation.hide_ends`` draws the
        clients' first and last blocks from one, so the server cannot know them as they started."""
        tag = hmac.new(self._secret, b"huscf derived seed v1\n" + purpose.encode(), hashlib.sha256).digest()
        return int.from_bytes(tag[:8], "little") >> 1

    @classmethod
    def load(cls, path: Path | None = None, create: bool = False, run_dir: Path | None = None) -> "SigningKey | None":
        """The key at ``path`` (default: ``default_key_path()``); made there when ``create`` and
        absent, else None when absent. One line (``HuscfError``) for a key inside ``run_dir``, a key
        file others can read, or one that is not a key."""
        path = Path(path or default_key_path())
        if run_dir is not None and _inside(path, Path(run_dir)):
            raise HuscfError(f"the signing key {path} is inside the run directory {run_dir}; keep it outside "
                             f"(set HUSCF_SIGNING_KEY), or whoever can change the run can sign what they change")
        made = False
        if not path.exists():
            if not create:
                return None
            made = _create(path)
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise HuscfError(f"signing key {path} can be read or written by other users; make it the owner's "
                             f"only (chmod 600 {path})")
        try:
            key = cls(bytes.fromhex(path.read_text(encoding="ascii").strip()), path)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            why = err.strerror if isinstance(err, OSError) else "not a hex-encoded key"
            raise HuscfError(f"cannot read the signing key {path}: {why}") from None
        key.made = made
        return key


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _create(path: Path) -> bool:
    """32 random bytes to ``path``, mode 0600, in one step: written to a private temporary file,
    then hard-linked to ``path``, which fails if another process made the key first (then its key,
    complete by then, is the one used). Whether this process made it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    except OSError as err:
        raise HuscfError(f"cannot make the checkpoint signing key {path}: {err.strerror or err} (set "
                         f"HUSCF_SIGNING_KEY to a writable path)") from None
