"""A deployment's deny list of revoked identities, its cheap reloading, and which
list applies to a peer.

The list is `revoked.txt` in the certificate directory: one `ROLE/NAME` per line
(`#` starts a comment), written atomically by `tandem certs revoke`. Servers keep a
`DenyList` per directory and look at the file's metadata at most every
`CHECK_INTERVAL` seconds, so a revocation takes effect within about a second
without a restart, and a call costs a clock read and a set lookup.

Revoking a name denies every certificate that carries it, whenever issued; a name
comes back only when its line is removed from the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tandem.files import replace_durably

log = logging.getLogger(__name__)

FILE_NAME = "revoked.txt"
CHECK_INTERVAL = 0.5  # seconds between looks at the file's metadata
_LOCK_NAME = ".revoked.lock"
_HEADER = "# Revoked identities (ROLE/NAME), one a line: `tandem certs revoke NAME` adds them.\n"

_Stamp = tuple[int, int, int] | None  # (mtime_ns, size, inode) of the file, None when it is absent


def path_in(directory: Path) -> Path:
    return Path(directory) / FILE_NAME


def _well_formed(entry: str) -> bool:
    role, sep, name = entry.partition("/")
    return bool(sep and role and name) and "/" not in name and not any(c.isspace() or c == "#" for c in entry)


def parse(text: str, source: Path | str = FILE_NAME) -> frozenset[str]:
    """The `ROLE/NAME` entries of a deny list; malformed lines are logged and skipped."""
    entries: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _well_formed(entry):
            log.error("%s:%d: ignoring malformed entry %r (expected ROLE/NAME)", source, number, line)
            continue
        entries.add(entry)
    return frozenset(entries)


def read(directory: Path) -> frozenset[str]:
    """The entries of the deny list in `directory`; empty when there is no file."""
    path = path_in(directory)
    try:
        return parse(path.read_text(encoding="utf-8"), path)
    except FileNotFoundError:
        return frozenset()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise writers, so two revocations at once both land."""
    fd = os.open(Path(directory) / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def add(directory: Path, entries: Iterable[str]) -> bool:
    """Add `ROLE/NAME` entries to the deny list atomically; returns whether any was new.

    Readers see the old file or the new one, never a partial one: the new list goes
    to a temporary file that replaces the old with one rename.
    """
    directory = Path(directory)
    wanted = list(entries)
    bad = [e for e in wanted if not _well_formed(e)]
    if bad:
        raise ValueError(f"not ROLE/NAME entries: {bad}")
    path = path_in(directory)
    with _locked(directory):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = _HEADER
        new = [e for e in dict.fromkeys(wanted) if e not in parse(text, path)]
        if not new:
            return False
        if not text.endswith("\n"):
            text += "\n"
        text += "".join(f"{e}\n" for e in new)
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    return True


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class DenyList:
    """The deny list of one directory, reread only when the file changed."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path_in(directory)
        self._monotonic = clock
        self._lock = threading.Lock()
        self._stamp: _Stamp = None
        self._entries: frozenset[str] = frozenset()
        self._checked = -float("inf")
        self._refresh()

    def _refresh(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            entries = parse(self.path.read_text(encoding="utf-8"), self.path) if stamp else frozenset()
        except FileNotFoundError:  # removed between the stat and the read
            stamp, entries = None, frozenset()
        except (OSError, UnicodeDecodeError) as exc:  # keep what we had until the file changes again
            log.error("cannot read the deny list %s: %s; keeping the previous one", self.path, exc)
            self._stamp = stamp
            return
        if entries != self._entries:
            log.info("deny list %s: %d revoked identities", self.path, len(entries))
        self._stamp, self._entries = stamp, entries

    def entries(self) -> frozenset[str]:
        """The current entries, looking at the file if `CHECK_INTERVAL` has passed."""
        now = self._monotonic()
        if now - self._checked >= CHECK_INTERVAL:
            with self._lock:
                if now - self._checked >= CHECK_INTERVAL:
                    self._refresh()
                    self._checked = now
        return self._entries

    def __contains__(self, entry: object) -> bool:
        return entry in self.entries()


# --- which deny list applies to a peer ---------------------------------------------


@functools.lru_cache(maxsize=1024)
def authority_key_id(pem: bytes) -> bytes | None:
    """The key id of the CA that signed a certificate (its AKI), None if it names none."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (ValueError, x509.ExtensionNotFound):
        return None


def ca_certificates(bundle: bytes) -> dict[bytes, x509.Certificate]:
    """The CA certificates of a PEM bundle by key id (computed where one lacks the extension)."""
    found: dict[bytes, x509.Certificate] = {}
    for cert in x509.load_pem_x509_certificates(bundle):
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
        found[ski] = cert
    return found


def _signed_by(pem: bytes, cas: dict[bytes, x509.Certificate]) -> bytes | None:
    """The key id of the CA among `cas` whose signature a certificate carries."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    for ca_id, ca in cas.items():
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca_id
    return None


_MAX_DEPTH = 4  # intermediates between a leaf and its trusted CA that are followed


def _anchor(pem: bytes, chain: bytes, cas: dict[bytes, x509.Certificate]) -> bytes | None:
    """The key id of the CA among `cas` that a certificate chains to through the
    intermediates of `chain`, each link checked by its signature."""
    found = _signed_by(pem, cas)
    if found is not None or not chain:
        return found
    try:
        current = x509.load_pem_x509_certificate(pem)
        links = x509.load_pem_x509_certificates(chain)
    except ValueError:
        return None
    for _ in range(_MAX_DEPTH):
        issuer = next((c for c in links if c != current and _issues(c, current)), None)
        if issuer is None:
            return None
        for ca_id, ca in cas.items():
            if _issues(ca, issuer):
                return ca_id
        current = issuer
    return None


def _issues(ca: x509.Certificate, cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Registry:
    """The deny lists of the deployments this process serves, by the CAs they trust.

    A peer is checked against the lists of the CA that signed its (already verified)
    certificate, so two deployments served by one process never share revocations,
    and no servicer has to pass a directory along.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_dir: dict[Path, DenyList] = {}
        # Replaced, never mutated, so calls read them without the lock.
        self._by_ca: dict[bytes, tuple[DenyList, ...]] = {}
        self._cas: dict[bytes, x509.Certificate] = {}
        self._signers: dict[bytes, bytes | None] = {}  # leaf PEM -> CA key id, when its AKI is not a trusted CA

    def for_directory(self, directory: Path) -> DenyList:
        """The one deny list of `directory` in this process."""
        with self._lock:
            key = Path(directory).resolve()
            if key not in self._by_dir:
                self._by_dir[key] = DenyList(key)
            return self._by_dir[key]

    def trust(self, bundle: bytes, deny: DenyList) -> None:
        """Apply `deny` to peers whose certificates a CA in `bundle` signed."""
        cas = ca_certificates(bundle)
        with self._lock:
            by_ca = dict(self._by_ca)
            for ca_id in cas:
                if deny not in by_ca.get(ca_id, ()):
                    by_ca[ca_id] = (*by_ca.get(ca_id, ()), deny)
            self._by_ca, self._cas, self._signers = by_ca, {**self._cas, **cas}, {}

    def _signer(self, pem: bytes, chain: bytes) -> bytes | None:
        """The key id of the trusted CA a verified certificate chains to: its issuer's, or,
        for a certificate from an intermediate (an enrolled agent's), the CA above it."""
        ca_id = authority_key_id(pem)
        if ca_id is not None and ca_id in self._by_ca:
            return ca_id
        # Issued by other tooling (no key id) or by an intermediate: found by the signatures, once.
        signers = self._signers
        if pem not in signers:
            if len(signers) >= 1024:
                signers.clear()
            signers[pem] = _anchor(pem, chain, self._cas)
        return signers[pem]

    def revoked(self, entry: str, pem: bytes, chain: bytes = b"") -> bool:
        """Whether `entry` (ROLE/NAME) is denied by the deployment that issued certificate `pem`
        (`chain`: the chain the peer presented, which names the intermediates between)."""
        ca_id = self._signer(pem, chain)
        return ca_id is not None and any(entry in deny for deny in self._by_ca.get(ca_id, ()))


REGISTRY = Registry()
