"""Resumable runs: every finished layer is saved, so a run stopped at any point continues where it was.

A checkpoint folder holds ``manifest.json`` (which run this is, and the finished layers in
execution order with each file's SHA-256) and one ``layer-NNNN.pt`` per rounded layer (its
``LayerResult`` and the minibatch sampler's generator state after it). Every file is written to
a temporary file in the same folder, fsynced, and renamed over the old one, so a crash leaves
the old or the new version of a file, never a mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.result import LayerResult

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "lightning-adaround checkpoint"
# 2: moments-form layers keep round-to-nearest on channels where it fits better (other integer weights)
# 3: the held-out samples are drawn once per run, not per layer (other minibatches, other integer weights)
# 4: each unit holds out its own samples again, drawn from the seed and its position (other integer weights)
VERSION = 4
MANIFEST = "manifest.json"
# Settings that change no integer weight: a resumed run may change them.
NOT_FINGERPRINTED = (
    "device_cache_bytes", "host_cache_bytes", "cache_dir", "carry_activations", "log_every_n_steps",
)


# ------------------------------------------------------------------------------ what identifies a run


def run_fingerprint(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    batches: Sequence[Any],
    config: AdaRoundConfig,
    activations: Mapping[str, Optional[Callable[..., Any]]],
) -> dict[str, Any]:
    """What must be equal for two runs to round identically, as plain JSON values.

    The settings that affect the result, the selected layers and their weight shapes, a
    SHA-256 of the model's parameters and floating-point buffers (the float weights, biases,
    BatchNorm statistics), and a SHA-256 of the calibration batches (tensors and arrays byte
    for byte, plain values by ``repr``, other objects by type only). ``forward_fn`` and the
    code of ``activations`` are not fingerprinted (only the names of the activations).
    """
    settings = {
        f.name: _plain(getattr(config, f.name))
        for f in dataclasses.fields(config) if f.name not in NOT_FINGERPRINTED
    }
    settings["activations"] = {name: _plain(fn) for name, fn in sorted(activations.items())}
    fingerprint = {
        "settings": settings,
        "layers": [[name, type(module).__name__, list(module.weight.shape)] for name, module in layers],
        "model": _hash_model(model),
        "data": _hash_batches(batches),
    }
    return json.loads(json.dumps(fingerprint))  # tuples -> lists: compares equal to what is read back


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def _update_with_tensor(digest: "hashlib._Hash", tensor: Tensor) -> None:
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())


def _hash_model(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        _update_with_tensor(digest, param)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():  # counters (BatchNorm's num_batches_tracked) are left out
            digest.update(name.encode())
            _update_with_tensor(digest, buffer)
    return digest.hexdigest()


def _hash_batches(batches: Sequence[Any]) -> str:
    digest = hashlib.sha256()

    def visit(item: Any) -> None:
        if isinstance(item, Tensor):
            digest.update(b"T")
            _update_with_tensor(digest, item)
        elif isinstance(item, (list, tuple)):
            digest.update(f"{type(item).__name__}[{len(item)}]".encode())
            for x in item:
                visit(x)
        elif isinstance(item, Mapping):
            digest.update(f"dict[{len(item)}]".encode())
            for key, x in item.items():
                digest.update(repr(key).encode())
                visit(x)
        elif item is None or isinstance(item, (bool, int, float, str, bytes)):
            digest.update(repr(item).encode())
        elif hasattr(item, "__array__"):  # numpy arrays and the like
            digest.update(b"A")
            _update_with_tensor(digest, torch.as_tensor(np.ascontiguousarray(item)))
        else:  # an object we cannot read: only its type counts
            digest.update(type(item).__qualname__.encode())

    digest.update(str(len(batches)).encode())
    for batch in batches:
        visit(batch)
    return digest.hexdigest()


# Settings whose default changed after they were added: what a checkpoint written before the
# setting existed rounded with (its default then), not today's default.
_FIRST_DEFAULTS = {"upstream_correction": 1.0}


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between a saved fingerprint and this run's, in words."""
    found = []
    # A setting added after the checkpoint was written counts as its default there: a new
    # setting's default rounds as the library did before it (else VERSION is raised).
    defaults = {f.name: _plain(getattr(AdaRoundConfig(), f.name)) for f in dataclasses.fields(AdaRoundConfig)}
    defaults.update(_FIRST_DEFAULTS)
    old = {**{k: v for k, v in defaults.items() if k in now["settings"]}, **saved.get("settings", {})}
    new = now["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            found.append(f"{key} is {old.get(key, '<unset>')!r} there and {new.get(key, '<unset>')!r} here")
    if saved.get("layers") != now["layers"]:
        found.append("the selected layers or their weight shapes differ")
    if saved.get("model") != now["model"]:
        found.append("the model's float weights differ")
    if saved.get("data") != now["data"]:
        found.append("the calibration data differs")
    return found


# ------------------------------------------------------------------------------ files


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its old content afterwards, never a partial write."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


class _Damaged(Exception):
    """A layer file that cannot be used (missing, checksum mismatch, unreadable)."""


@dataclass
class _Entry:
    name: str
    file: Optional[str]  # None: no calibration batch reached the layer (left in float)
    sha256: Optional[str]


@dataclass
class Restored:
    """A finished layer read back: its result (``None`` if unreached) and the generator state after it."""

    result: Optional[LayerResult]
    generator_state: Optional[Tensor]


class RoundingCheckpoint:
    """The checkpoint folder of one run. Use :meth:`open`; the core calls :meth:`restore` and ``save_*``."""

    def __init__(self, folder: Path, label: str, fingerprint: dict[str, Any], entries: list[_Entry]) -> None:
        self.folder = folder
        self.label = label  # the folder as the user wrote it, for messages
        self.fingerprint = fingerprint
        self.entries = entries

    @classmethod
    def open(cls, checkpoint_dir: PathLike, fingerprint: dict[str, Any]) -> "RoundingCheckpoint":
        """Create the folder, or read its manifest and refuse it if it belongs to another run."""
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a folder path (str or os.PathLike), got {checkpoint_dir!r}.")
        label = os.fspath(checkpoint_dir)
        folder = Path(label)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"checkpoint_dir {label!r} is a file; pass a folder (it is created if missing).")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / MANIFEST
        if not manifest.exists():
            return cls(folder, label, fingerprint, [])
        saved = _read_manifest(manifest, label)
        differences = _differences(saved["fingerprint"], fingerprint)
        if differences:
            raise ValueError(
                f"checkpoint_dir {label!r} holds a checkpoint of a different run ({'; '.join(differences)}); "
                f"resuming would mix two roundings. Use a new checkpoint_dir, or delete {label!r} to start over."
            )
        return cls(folder, label, fingerprint, [_Entry(**e) for e in saved["layers"]])

    def restore(self, index: int, name: str) -> Optional[Restored]:
        """Layer ``index`` of the run as saved, or ``None`` when it must be computed.

        A damaged file (missing, wrong checksum, unreadable) is dropped with a warning, with every
        layer after it: they are computed again, with the same result.
        """
        if index >= len(self.entries):
            return None
        entry = self.entries[index]
        if entry.name != name:
            raise ValueError(
                f"checkpoint_dir {self.label!r} finished layer {entry.name!r} at position {index} where this run "
                f"reaches {name!r}: the forward pass visits the layers in another order (a different forward_fn?). "
                f"Use a new checkpoint_dir, or delete {self.label!r} to start over."
            )
        if entry.file is None:
            return Restored(None, None)
        try:
            return self._read_layer(entry)
        except _Damaged as err:
            warnings.warn(
                f"checkpoint_dir {self.label!r}: {entry.file} is damaged ({err}); rounding layer {name!r} "
                "and the layers after it again.",
                stacklevel=3,
            )
            del self.entries[index:]
            return None

    def _read_layer(self, entry: _Entry) -> Restored:
        path = self.folder / str(entry.file)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise _Damaged(f"cannot be read: {type(err).__name__}") from err
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise _Damaged("its SHA-256 does not match the manifest")
        try:
            saved = torch.load(io.BytesIO(data), weights_only=True)
            result = LayerResult.from_state(saved["result"])
            state = saved["generator_state"]
        except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
            raise _Damaged(f"cannot be loaded: {type(err).__name__}") from err
        if result.name != entry.name or not isinstance(state, Tensor):
            raise _Damaged("it holds another layer")
        return Restored(result, state)

    def save_layer(self, index: int, result: LayerResult, generator_state: Tensor) -> None:
        """Write layer ``index``'s result, then the manifest that lists it (in that order)."""
        buffer = io.BytesIO()
        torch.save({"result": result.state(), "generator_state": generator_state.clone()}, buffer)
        data = buffer.getvalue()
        file = f"layer-{index:04d}.pt"
        _atomic_write(self.folder / file, data)
        self._append(index, _Entry(result.name, file, hashlib.sha256(data).hexdigest()))

    def save_unreached(self, index: int, name: str) -> None:
        self._append(index, _Entry(name, None, None))

    def _append(self, index: int, entry: _Entry) -> None:
        entries = self.entries[:index] + [entry]
        manifest = {
            "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
            "layers": [dataclasses.asdict(e) for e in entries],
        }
        _atomic_write(self.folder / MANIFEST, json.dumps(manifest, indent=1).encode())
        self.entries = entries


def _read_manifest(path: Path, label: str) -> dict[str, Any]:
    def unreadable(reason: str) -> ValueError:
        return ValueError(
            f"checkpoint_dir {label!r} has a {MANIFEST} that cannot be read ({reason}); delete {label!r} "
            "(or use a new checkpoint_dir) to start over."
        )

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise unreadable(f"{type(err).__name__}: {err}") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise unreadable("it is not a lightning-adaround checkpoint")
    if saved.get("version") != VERSION:
        raise unreadable(f"format version {saved.get('version')!r}; this library reads version {VERSION}")
    layers = saved.get("layers")
    if not isinstance(saved.get("fingerprint"), dict) or not isinstance(layers, list) or not all(
        isinstance(e, dict) and set(e) == {"name", "file", "sha256"} for e in layers
    ):
        raise unreadable("its fields are incomplete")
    return saved
