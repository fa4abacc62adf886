"""A bundle's manifest.json: what it promises, checked at every open, and the weights id.

``manifest.json`` is ``{"files": {"<relative/posix/path>": {"sha256": "<64 hex>", "bytes": N}}}``
for every file of the bundle but itself (``bundle.write_manifest``). Every open checks sizes
(cheap: one ``stat`` per file) and refuses weight files the manifest does not list;
``verify`` recomputes every sha256 (``fusar-edge verify``, ``ask --verify``).

The weights id (``weights_id``) is documented in ``bundle.py``. Torch-free, so ``fusar-edge
verify`` starts fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import BundleError
from ..hashing import sha256_file

MANIFEST = "manifest.json"
UNHASHED = "unhashed (no manifest.json)"
# What the runtimes load weights from; an unlisted one would be loaded unchecked.
WEIGHT_PATTERNS = ("*.safetensors", "*.onnx", "*.onnx.data")
LARGE_BUNDLE = 256 << 20  # bytes: verify shows a progress bar above this
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Verification:
    """What ``verify`` found: one line per problem, and the id of the content actually on disk."""

    bundle: Path
    files: int = 0
    bytes: int = 0
    weights: str | None = None  # from the recomputed hashes; None when a listed file is missing
    problems: list[dict] = field(default_factory=list)  # {"file", "problem", "expected", "found"}

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [problem_line(p) for p in self.problems]

    def summary(self) -> str:
        if self.ok:
            return (f"{self.bundle}: OK, {self.files} files, {self.bytes} bytes match {MANIFEST}; "
                    f"weights {self.weights}")
        kinds = sorted({p["problem"] for p in self.problems})
        return (f"{self.bundle}: {len(self.problems)} problem(s) against {MANIFEST} ({', '.join(kinds)}): "
                f"{problem_line(self.problems[0])}")

    def to_json(self) -> dict:
        return {"bundle": str(self.bundle), "ok": self.ok, "files": self.files, "bytes": self.bytes,
                "weights": self.weights, "problems": self.problems}


def problem_line(p: dict) -> str:
    if p["problem"] == "missing":
        return f"{p['file']}: missing (listed in {MANIFEST})"
    if p["problem"] == "unexpected":
        return f"{p['file']}: not listed in {MANIFEST}"
    unit = " bytes" if p["problem"] == "size" else ""
    what = "size" if p["problem"] == "size" else "sha256"
    return f"{p['file']}: {what} {p['found']}{unit}, {MANIFEST} records {p['expected']}{unit}"


def read_manifest(bundle: Path) -> dict[str, dict] | None:
    """The manifest's file records, or None when the bundle has no manifest.json.

    Every path must stay inside the bundle and every record hold a sha256 and a size, so a
    malformed manifest cannot send the checks elsewhere.
    """
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise BundleError(f"{path}: files: expected an object of path -> {{sha256, bytes}}")
    for name, record in files.items():
        _check_record(path, name, record)
    return files


def _check_record(path: Path, name: str, record) -> None:
    rel = PurePosixPath(name)
    if (not name or rel.is_absolute() or ".." in rel.parts or "\\" in name
            or any(ord(ch) < 32 for ch in name) or rel.name == MANIFEST):
        raise BundleError(f"{path}: files: {name!r} is not a relative path inside the bundle")
    if (not isinstance(record, dict) or not isinstance(record.get("sha256"), str)
            or not _SHA256.fullmatch(record["sha256"]) or isinstance(record.get("bytes"), bool)
            or not isinstance(record.get("bytes"), int) or record["bytes"] < 0):
        raise BundleError(f"{path}: files.{name}: expected {{\"sha256\": 64 hex digits, \"bytes\": a size}}")


def weights_id(records: dict[str, str]) -> str:
    """sha256 over ``"<sha256>  <path>\\n"`` for every file, sorted by path (see bundle.py)."""
    h = hashlib.sha256()
    for name in sorted(records):
        h.update(f"{records[name]}  {name}\n".encode("utf-8"))
    return h.hexdigest()


def _unlisted(bundle: Path, files: dict, patterns) -> list[str]:
    found = {p.relative_to(bundle).as_posix() for pattern in patterns for p in bundle.rglob(pattern) if p.is_file()}
    return sorted(found - set(files) - {MANIFEST})


def check_sizes(bundle: Path, files: dict) -> None:
    """Every listed file present at its recorded size, no unlisted weight file: one stat per file."""
    bundle = Path(bundle)
    for name, record in sorted(files.items()):
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {bundle / MANIFEST})")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleError(f"{path}: {size} bytes, expected {record['bytes']} as {bundle / MANIFEST} records "
                              "(the file changed or is damaged; `fusar-edge verify BUNDLE` checks every sha256)")
    extra = _unlisted(bundle, files, WEIGHT_PATTERNS)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise BundleError(f"{bundle / extra[0]}: weight file not listed in {bundle / MANIFEST}{more}; "
                          "a bundle's weights must be the ones its manifest records")


def verify(bundle: Path, progress: bool = True) -> Verification:
    """Recompute every sha256 (streamed) and compare with the manifest; unlisted files are problems too."""
    bundle = Path(bundle)
    files = read_manifest(bundle)
    if files is None:
        raise BundleError(f"{bundle / MANIFEST}: missing, so there is nothing to verify the bundle against")
    result = Verification(bundle, files=len(files))
    actual = {}
    present = {n: r for n, r in files.items() if (bundle / n).is_file()}
    bar = _progress_bar(sum((bundle / n).stat().st_size for n in present), progress)
    try:
        for name, record in sorted(files.items()):
            actual[name] = _check_file(bundle, name, record, result, bar)
    finally:
        bar.close()
    for name in _unlisted(bundle, files, ("*",)):
        result.problems.append({"file": str(bundle / name), "problem": "unexpected", "expected": None, "found": None})
    if None not in actual.values():
        result.weights = weights_id(actual)
    return result


def _check_file(bundle: Path, name: str, record: dict, result: Verification, bar) -> str | None:
    """The file's sha256 (None when it is missing); a problem is appended for any difference."""
    path = bundle / name
    if not path.is_file():
        result.problems.append({"file": str(path), "problem": "missing", "expected": record["sha256"], "found": None})
        return None
    digest = sha256_file(path, progress=bar.update)
    size = path.stat().st_size
    result.bytes += size
    if size != record["bytes"]:
        result.problems.append({"file": str(path), "problem": "size", "expected": record["bytes"], "found": size})
    elif digest != record["sha256"]:
        result.problems.append({"file": str(path), "problem": "sha256", "expected": record["sha256"],
                                "found": digest})
    return digest


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="verifying", file=sys.stderr,
                disable=not enabled or total < LARGE_BUNDLE, leave=False)


def check_bundle(bundle: Path, verify_hashes: bool = False) -> str:
    """The check every open runs -> the bundle's weights id.

    Sizes and unlisted weights always; with ``verify_hashes`` every sha256 is recomputed and the
    id comes from those hashes. A bundle without manifest.json opens unchecked, with the id
    ``UNHASHED`` saying so (``verify_hashes`` then refuses it: there is nothing to check against).
    """
    bundle = Path(bundle)
    if verify_hashes:
        result = verify(bundle)
        if not result.ok:
            raise BundleError(result.summary() + " (`fusar-edge verify BUNDLE` lists them all)")
        return result.weights
    files = read_manifest(bundle)
    if files is None:
        return UNHASHED
    check_sizes(bundle, files)
    return weights_id({name: record["sha256"] for name, record in files.items()})
