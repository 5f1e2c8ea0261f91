"""
Encode values into a JSON tree plus raw byte buffers, and decode them in place.

Tensors and arrays become raw bytes with dtype and shape, RNGs their state, objects
with ``state_dict()`` their state dict (loaded back into the live object), attrs
instances, dicts, lists and tuples their items, JSON-able values JSON, and only what
has no other form a cloudpickle. Decoding takes the live value built by ``init()``
and restores into it where it can, so that references to it stay valid.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import cloudpickle
import numpy as np
import torch

from resumable._dtensor import local_shard, sharded_like
from resumable.errors import (
    IncompatibleSnapshotError,
    ResumableError,
    StateDefinitionError,
)

logger = logging.getLogger(__name__)

Node = dict[str, Any]

# Metadata key that marks an attrs field as rebuilt by init() and never snapshotted.
TRANSIENT_KEY = "resumable.transient"

_PLAIN_SCALARS = (str, int, float, bool, type(None))
# Device types already warned about as missing, so that a model warns once.
_WARNED_DEVICES: set[str] = set()
_CAPTURE_ADVICE = (
    "Mark the field resumable.transient() and rebuild it in init(), or give the "
    "object state_dict() and load_state_dict() methods."
)


def is_transient(field: attrs.Attribute[Any]) -> bool:
    return bool(field.metadata.get(TRANSIENT_KEY))


def snapshot_fields(cls: type) -> list[attrs.Attribute[Any]]:
    """Return the attrs fields of ``cls`` that snapshots hold."""
    return [field for field in attrs.fields(cls) if not is_transient(field)]


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """Return the module inside DDP, DataParallel and torch.compile wrappers."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            module = inner
        elif isinstance(module, parallel):
            module = module.module
        else:
            return module


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Return the raw bytes of a dense tensor as a flat uint8 array, on the CPU."""
    flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    flat = flat.reshape(-1)
    return flat.view(torch.uint8).numpy()


class Encoder:
    """Turns values into JSON nodes, collecting their raw bytes in ``buffers``."""

    def __init__(
        self, *, dry_run: bool = False, grads: bool = False, staged: bool = False
    ) -> None:
        self.buffers: list[Any] = []
        self._dry_run = dry_run
        # Inside a step, gradients may be mid-accumulation: keep them too.
        self._grads = grads
        # For a stager (``_staging``): tensors are handed as they are, detached,
        # for the stager to copy once, straight into its arena, whatever their
        # device, layout in memory or dtype.
        self._staged = staged
        # Built once: an encoder visits every tensor of a state, 10 000 of them
        # in some, and a new table per value cost several microseconds each.
        self._table = self._kinds()

    def encode(self, value: Any, path: str) -> Node:
        if _is_plain(value):
            return {"k": "json", "v": value}
        for kind, matches, encode in self._table:
            if matches(value):
                node: Node = encode(value, path)
                node["k"] = kind
                return node
        return self._pickle(value, path)

    def _kinds(self) -> Sequence[tuple[str, Callable[[Any], bool], Any]]:
        return (
            ("tensor", _is_dense_tensor, self._tensor),
            ("ndarray", _is_raw_array, self._array),
            ("torch_rng", _of(torch.Generator), self._torch_rng),
            ("numpy_rng", _of(np.random.Generator), self._numpy_rng),
            ("numpy_legacy_rng", _exactly(np.random.RandomState), self._legacy_rng),
            ("random", _exactly(random.Random), self._random),
            ("module", _of(torch.nn.Module), self._module),
            ("stateful", _is_stateful, self._stateful),
            ("attrs", _is_attrs_instance, self._attrs),
            ("dict", _exactly(dict, OrderedDict), self._dict),
            ("list", _exactly(list), self._sequence),
            ("tuple", _exactly(tuple), self._sequence),
        )

    def add_buffer(self, make: Callable[[], Any], size: int | None = None) -> int:
        """Add a buffer; a dry run keeps only its size, where it is known."""
        self.buffers.append(size if self._dry_run else make())
        return len(self.buffers) - 1

    def _tensor(self, tensor: torch.Tensor, path: str) -> Node:
        size = tensor.numel() * tensor.element_size()
        return {
            "b": self.add_buffer(lambda: self._tensor_buffer(tensor), size),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "device": tensor.device.type,
            "grad": tensor.requires_grad,
            "parameter": isinstance(tensor, torch.nn.Parameter),
        }

    def _tensor_buffer(self, tensor: torch.Tensor) -> Any:
        return tensor.detach() if self._staged else tensor_bytes(tensor)

    def _array(self, array: np.ndarray, path: str) -> Node:
        return {
            "b": self.add_buffer(
                lambda: np.ascontiguousarray(array).reshape(-1).view(np.uint8),
                array.nbytes,
            ),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }

    def _torch_rng(self, generator: torch.Generator, path: str) -> Node:
        state = generator.get_state()
        return {"device": generator.device.type, "state": self._tensor(state, path)}

    def _numpy_rng(self, generator: np.random.Generator, path: str) -> Node:
        return {"state": self.encode(generator.bit_generator.state, path)}

    def _legacy_rng(self, generator: np.random.RandomState, path: str) -> Node:
        return {"state": self.encode(generator.get_state(legacy=False), path)}

    def _random(self, generator: random.Random, path: str) -> Node:
        return {"state": self.encode(generator.getstate(), path)}

    def _module(self, module: torch.nn.Module, path: str) -> Node:
        inner = unwrap_module(module)
        node = {
            "state": self.encode(inner.state_dict(), f"{path}.state_dict()"),
            "training": [child.training for child in inner.modules()],
            "requires_grad": [p.requires_grad for p in inner.parameters()],
        }
        if self._grads:
            grads = {name: local_shard(p.grad) for name, p in inner.named_parameters()}
            node["grads"] = self.encode(grads, f"{path} gradients")
        return node

    def _stateful(self, value: Any, path: str) -> Node:
        return {"state": self.encode(value.state_dict(), f"{path}.state_dict()")}

    def _attrs(self, value: Any, path: str) -> Node:
        fields = {
            field.name: self.encode(getattr(value, field.name), f"{path}.{field.name}")
            for field in snapshot_fields(type(value))
        }
        cls = type(value)
        return {
            "class": cls.__qualname__,
            "b": self.add_buffer(lambda: cloudpickle.dumps(cls)),
            "fields": fields,
        }

    def _dict(self, value: dict[Any, Any], path: str) -> Node:
        items = [
            [self.encode(key, f"{path} key"), self.encode(item, f"{path}[{key!r}]")]
            for key, item in value.items()
        ]
        return {"items": items, "ordered": type(value) is OrderedDict}

    def _sequence(self, value: Sequence[Any], path: str) -> Node:
        if all(_is_plain(item) for item in value):
            return {"plain": list(value)}
        return {"items": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}

    def _pickle(self, value: Any, path: str) -> Node:
        try:
            data = cloudpickle.dumps(value)
        except Exception as err:
            msg = (
                f"Cannot snapshot {path}: a {type(value).__name__} that cloudpickle "
                f"cannot serialise ({type(err).__name__}: {err}). {_CAPTURE_ADVICE}"
            )
            raise StateDefinitionError(msg) from err
        return {"k": "pickle", "b": self.add_buffer(lambda: data)}


class Decoder:
    """Restores values from JSON nodes and the buffers they refer to."""

    def __init__(self, buffers: Sequence[memoryview]) -> None:
        self._buffers = buffers
        # False while decoding a state dict: live values then only say where each
        # tensor goes, and load_state_dict() does the loading.
        self._in_place = True

    def decode(self, node: Node, current: Any, path: str) -> Any:
        decode = getattr(self, f"_decode_{node['k']}", None)
        if decode is None:
            msg = f"Unknown node kind {node['k']!r} at {path}."
            raise IncompatibleSnapshotError(msg)
        try:
            return decode(node, current, path)
        except ResumableError:
            raise
        except Exception as err:
            msg = f"Cannot restore {path}: {type(err).__name__}: {err}"
            raise IncompatibleSnapshotError(msg) from err

    def _decode_json(self, node: Node, current: Any, path: str) -> Any:
        return self._fill(current, node["v"])

    def _decode_tensor(self, node: Node, current: Any, path: str) -> torch.Tensor:
        dtype = getattr(torch, node["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            msg = f"Unknown tensor dtype {node['dtype']!r} at {path}."
            raise IncompatibleSnapshotError(msg)
        raw = self._buffers[node["b"]]
        flat = torch.frombuffer(raw, dtype=torch.uint8) if len(raw) else None
        if flat is None:
            flat = torch.empty(0, dtype=torch.uint8)
        source = flat.view(dtype).reshape(node["shape"])
        if isinstance(current, torch.Tensor) and _fits(current, source):
            if _same_memory(current, source):
                # Read straight into it (``_placement``): the bytes are there.
                torch.autograd.graph.increment_version(current)
                return current
            if not self._in_place:
                return source.to(current.device, copy=True)
            with torch.no_grad():
                current.copy_(source)
            return current
        return _new_tensor(source, node, path)

    def _decode_ndarray(self, node: Node, current: Any, path: str) -> np.ndarray:
        dtype = np.dtype(node["dtype"])
        source = np.frombuffer(self._buffers[node["b"]], dtype=dtype)
        source = source.reshape(node["shape"])
        if (
            type(current) is np.ndarray
            and current.shape == source.shape
            and current.dtype == source.dtype
            and current.flags.writeable
        ):
            # Read straight into it (``_placement``): the bytes are there.
            placed = bool(source.size) and current.ctypes.data == source.ctypes.data
            if not (placed and current.flags.c_contiguous):
                current[...] = source
            return current
        return source.copy()

    def _decode_torch_rng(self, node: Node, current: Any, path: str) -> Any:
        state = self._decode_tensor(node["state"], None, path)
        generator = current
        if not (
            isinstance(current, torch.Generator)
            and current.device.type == node["device"]
        ):
            generator = torch.Generator(device=_device(node["device"], path))
        generator.set_state(state)
        return generator

    def _decode_numpy_rng(self, node: Node, current: Any, path: str) -> Any:
        state = self.decode(node["state"], None, path)
        generator = current
        kind = state["bit_generator"]
        if not (
            isinstance(current, np.random.Generator)
            and type(current.bit_generator).__name__ == kind
        ):
            generator = np.random.Generator(getattr(np.random, kind)())
        generator.bit_generator.state = state
        return generator

    def _decode_numpy_legacy_rng(self, node: Node, current: Any, path: str) -> Any:
        generator = current
        if type(current) is not np.random.RandomState:
            generator = np.random.RandomState()
        generator.set_state(self.decode(node["state"], None, path))
        return generator

    def _decode_random(self, node: Node, current: Any, path: str) -> Any:
        generator = current if type(current) is random.Random else random.Random()
        generator.setstate(self.decode(node["state"], None, path))
        return generator

    def _decode_module(self, node: Node, current: Any, path: str) -> Any:
        if not isinstance(current, torch.nn.Module):
            _refuse_in_place(current, "a torch.nn.Module", path)
        inner = unwrap_module(current)
        # The live state dict only says where each tensor goes (bytes read
        # there already stay); load_state_dict() does the loading.
        self._in_place, in_place = False, self._in_place
        try:
            state = self.decode(
                node["state"], inner.state_dict(), f"{path}.state_dict()"
            )
        finally:
            self._in_place = in_place
        try:
            inner.load_state_dict(state, strict=True)
        except RuntimeError as err:
            msg = (
                f"Cannot restore {path}: the snapshot's parameters do not fit the "
                f"model that init() built. {err}"
            )
            raise IncompatibleSnapshotError(msg) from None
        if "grads" in node:
            self._restore_grads(inner, node["grads"], path)
        parameters = list(inner.parameters())
        if len(parameters) == len(node.get("requires_grad", ())):
            for parameter, flag in zip(parameters, node["requires_grad"], strict=True):
                parameter.requires_grad_(flag)
        modules = list(inner.modules())
        if len(modules) == len(node["training"]):
            for module, training in zip(modules, node["training"], strict=True):
                module.training = training
        return current

    def _restore_grads(self, module: torch.nn.Module, node: Node, path: str) -> None:
        parameters = dict(module.named_parameters())
        grads = self.decode(node, None, f"{path} gradients")
        for name, grad in grads.items():
            parameter = parameters[name]
            if grad is not None and local_shard(parameter) is not parameter:
                grad = sharded_like(parameter, grad)
            if grad is None:
                parameter.grad = None
            elif parameter.grad is not None and parameter.grad.shape == grad.shape:
                parameter.grad.copy_(grad)
            else:
                parameter.grad = grad.to(parameter.device)

    def _decode_stateful(self, node: Node, current: Any, path: str) -> Any:
        if not _is_stateful(current):
            _refuse_in_place(current, "an object with load_state_dict()", path)
        live = current.state_dict()
        self._in_place, in_place = False, self._in_place
        try:
            state = self.decode(node["state"], live, f"{path}.state_dict()")
        finally:
            self._in_place = in_place
        if isinstance(current, torch.optim.Optimizer):
            _take_live_parameter_names(state, live, path)
        try:
            current.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            msg = (
                f"Cannot restore {path}: load_state_dict() of "
                f"{type(current).__name__} rejected the snapshot's state: {err}"
            )
            raise IncompatibleSnapshotError(msg) from err
        return current

    def _decode_attrs(self, node: Node, current: Any, path: str) -> Any:
        if not _is_attrs_instance(current):
            current = self._new_attrs_instance(node, path)
        elif type(current).__qualname__ != node["class"]:
            msg = (
                f"Cannot restore {path}: the snapshot holds a {node['class']}, but "
                f"init() built a {type(current).__name__}. Build the same class in "
                "init(), or start over with --fresh."
            )
            raise IncompatibleSnapshotError(msg)
        restore_fields(self, current, node["fields"], path)
        return current

    def _new_attrs_instance(self, node: Node, path: str) -> Any:
        """Make an instance, without calling __init__, for fields to be filled."""
        cls = cloudpickle.loads(self._buffers[node["b"]])
        instance = cls.__new__(cls)
        for field in attrs.fields(cls):
            if is_transient(field):
                default = field.default
                if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                    default = default.factory()
                object.__setattr__(instance, field.name, default)
        return instance

    def _decode_dict(self, node: Node, current: Any, path: str) -> Any:
        targets = current if isinstance(current, dict) else {}
        result: dict[Any, Any] = OrderedDict() if node["ordered"] else {}
        for key_node, value_node in node["items"]:
            key = self.decode(key_node, None, f"{path} key")
            result[key] = self.decode(value_node, targets.get(key), f"{path}[{key!r}]")
        return self._fill(current, result)

    def _decode_list(self, node: Node, current: Any, path: str) -> Any:
        return self._fill(current, self._items(node, current, path))

    def _decode_tuple(self, node: Node, current: Any, path: str) -> Any:
        return tuple(self._items(node, current, path))

    def _items(self, node: Node, current: Any, path: str) -> list[Any]:
        if "plain" in node:
            return list(node["plain"])
        targets = list(current) if isinstance(current, list | tuple) else []
        targets += [None] * (len(node["items"]) - len(targets))
        return [
            self.decode(item, target, f"{path}[{i}]")
            for i, (item, target) in enumerate(
                zip(node["items"], targets, strict=False)
            )
        ]

    def _fill(self, current: Any, value: Any) -> Any:
        return _update_in_place(current, value) if self._in_place else value

    def _decode_pickle(self, node: Node, current: Any, path: str) -> Any:
        try:
            return cloudpickle.loads(self._buffers[node["b"]])
        except Exception as err:
            msg = (
                f"Cannot unpickle {path} ({type(err).__name__}: {err}). The snapshot "
                "may come from other code or other library versions."
            )
            raise IncompatibleSnapshotError(msg) from err


def restore_fields(
    decoder: Decoder, target: Any, fields: dict[str, Node], path: str
) -> None:
    """Restore the snapshotted fields of an attrs instance in place."""
    for name, node in fields.items():
        field_path = f"{path}.{name}"
        value = decoder.decode(node, getattr(target, name, None), field_path)
        # object.__setattr__ also works on frozen attrs classes.
        object.__setattr__(target, name, value)


def _is_plain(value: Any) -> bool:
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is list:
        return all(_is_plain(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    return False


def _of(*classes: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, classes)


def _exactly(*classes: type) -> Callable[[Any], bool]:
    return lambda value: type(value) in classes


def _is_dense_tensor(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type != "meta"
    )


def _is_raw_array(value: Any) -> bool:
    if type(value) is not np.ndarray or value.dtype.hasobject:
        return False
    return bool(np.dtype(value.dtype.str) == value.dtype)


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _is_attrs_instance(value: Any) -> bool:
    return attrs.has(type(value))


def _fits(current: Any, source: torch.Tensor) -> bool:
    return (
        isinstance(current, torch.Tensor)
        and current.shape == source.shape
        and current.dtype == source.dtype
        and current.layout == torch.strided
    )


def _same_memory(current: torch.Tensor, source: torch.Tensor) -> bool:
    return (
        current.device.type == "cpu"
        and source.numel() > 0
        and current.data_ptr() == source.data_ptr()
        and current.is_contiguous()
    )


def _device(kind: str, path: str) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    available = getattr(torch, kind, None)
    if available is not None and available.is_available():
        return torch.device(kind)
    if kind not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(kind)
        logger.warning("device missing: device=%s, first=%s, placed on cpu", kind, path)
    return torch.device("cpu")


def _new_tensor(source: torch.Tensor, node: Node, path: str) -> torch.Tensor:
    tensor = source.to(_device(node["device"], path), copy=True)
    if node["parameter"]:
        return torch.nn.Parameter(tensor, requires_grad=node["grad"])
    return tensor.requires_grad_(node["grad"])


def _update_in_place(current: Any, value: Any) -> Any:
    """Fill a list or dict that init() built, so that references to it stay valid."""
    if type(current) is list and type(value) is list:
        current[:] = value
        return current
    if type(current) is dict and type(value) is dict:
        current.clear()
        current.update(value)
        return current
    return value


def canonical_name(name: str) -> str:
    """Return a parameter name without the prefixes of wrappers."""
    parts = [part for part in name.split(".") if part not in ("_orig_mod", "module")]
    return ".".join(parts)


def _take_live_parameter_names(
    state: dict[str, Any], live: dict[str, Any], path: str
) -> None:
    """Keep the live optimizer's parameter names where they name the same ones."""
    saved_groups, live_groups = state.get("param_groups", []), live["param_groups"]
    for saved, current in zip(saved_groups, live_groups, strict=False):
        if "param_names" not in saved or "param_names" not in current:
            continue
        old = [canonical_name(name) for name in saved["param_names"]]
        new = [canonical_name(name) for name in current["param_names"]]
        if old != new:
            msg = (
                f"Cannot restore {path}: the snapshot's optimizer holds parameters "
                f"{old}, the live one {new}."
            )
            raise IncompatibleSnapshotError(msg)
        saved["param_names"] = current["param_names"]


def _refuse_in_place(current: Any, expected: str, path: str) -> None:
    msg = (
        f"Cannot restore {path}: the snapshot holds the state of {expected}, but "
        f"init() built {type(current).__name__}. Build that object in init(), so "
        "that its state can be loaded into it."
    )
    raise IncompatibleSnapshotError(msg)
