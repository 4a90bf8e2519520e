"""Moving, packing and re-pointing the tensors a module owns, from outside the module.

A layer's state is its parameters AND its buffers (QuantLinear keeps its packed int4/int8 weights and fp16
scales as buffers), minus the tensors of submodules it shares with the rest of the model (every decoder
layer holds the one RotaryEmbedding of the model; streaming or moving that table with one layer would pull
it away from all the others). These helpers are what the offload driver (memory/offload.py) is built from:

    refs = owned_tensors(layer, shared_modules(model))   # what the layer owns
    layout = ByteLayout.of(refs)                          # where each tensor sits in one byte buffer
    host = pack(refs, layout, allocate)                   # one contiguous (pinned) CPU buffer per layer
    point_at(refs, layout.views(slot))                    # the layer now computes from the slot's bytes

Re-pointing keeps each nn.Parameter object (``param.data = view``), so anything that holds the parameter
(a tied lm_head, load_weights' name table) still sees the same object; buffers are replaced in
``module._buffers``. A module must keep its state in parameters and buffers: a tensor kept in a plain
attribute cannot be moved from outside (warn_unregistered_tensors names such attributes).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vramwise.quant.apply import set_submodule

log = logging.getLogger(__name__)

#: Byte alignment of every tensor inside a packed layer. cudaMalloc blocks are 256-byte aligned, so a
#: tensor at a 256-byte offset of a slot keeps the alignment vectorised and TMA loads expect, and every
#: dtype's element size divides it (needed for the uint8 -> dtype views).
ALIGN = 256

#: Makes an uninitialised uint8 CPU tensor of n bytes: where a streamed layer's host copy lives.
HostAllocator = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class TensorRef:
    """One tensor slot of a module: module.<name>, a parameter or a buffer. Holds no tensor itself, so
    keeping refs around never keeps a moved-away tensor alive."""

    module: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        table = self.module._parameters if self.is_param else self.module._buffers
        return table[self.name]  # type: ignore[return-value]

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            # Same Parameter object, new storage: ties and outside references stay valid.
            self.module._parameters[self.name].data = tensor  # type: ignore[union-attr]
        else:
            self.module._buffers[self.name] = tensor


def shared_modules(root: nn.Module) -> set[int]:
    """ids of the modules reachable from `root` by more than one path (the rotary table every layer holds),
    and everything below them."""
    counts = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    shared: set[int] = set()
    for m in root.modules():
        if counts[id(m)] > 1:
            shared.update(id(sub) for sub in m.modules())
    return shared


def owned_tensors(module: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> list[TensorRef]:
    """Parameters and buffers of `module` and its submodules, except those of modules in `skip` (ids).

    A tensor registered twice is listed once. For a parameter that is enough (both names hold the same
    Parameter object, whose .data point_at replaces); a buffer registered under two names would keep its
    second name on the old tensor, and no model of ours does that.
    """
    refs: list[TensorRef] = []
    seen: set[int] = set()
    for m in module.modules():
        if id(m) in skip:
            continue
        for is_param, table in ((True, m._parameters), (False, m._buffers)):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                refs.append(TensorRef(m, name, is_param))
    return refs


def warn_unregistered_tensors(module: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """Names of tensors kept in plain attributes of `module`'s submodules (not parameters or buffers): the
    driver cannot move them, so a layer that has some would still read them from wherever they are."""
    found = []
    for name, m in module.named_modules():
        if id(m) in skip:
            continue
        for attr, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not attr.startswith("__"):
                found.append(f"{name}.{attr}" if name else attr)
    if found:
        log.warning("tensors outside parameters/buffers cannot be offloaded and stay where they are: %s",
                    ", ".join(found[:8]))
    return found


def tensor_bytes(refs: Iterable[TensorRef]) -> int:
    return sum(r.get().numel() * r.get().element_size() for r in refs)


def move(refs: Iterable[TensorRef], device: torch.device, float_dtype: torch.dtype | None = None) -> None:
    """Move every tensor to `device`; floating-point ones also to `float_dtype` when given. Integer
    tensors (packed codes, permutations) keep their dtype."""
    for r in refs:
        t = r.get()
        dtype = float_dtype if float_dtype is not None and t.is_floating_point() else t.dtype
        if t.device != device or t.dtype != dtype:
            r.set(t.to(device=device, dtype=dtype))


# ------------------------------------------------------------------------------------------------------------
# Packing a module's tensors into one byte buffer
# ------------------------------------------------------------------------------------------------------------


def align(n: int) -> int:
    """n rounded up to a multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class TensorPlace:
    offset: int  # bytes from the start of the buffer, a multiple of ALIGN
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ByteLayout:
    """Where each tensor of a module sits in one contiguous byte buffer; the same layout is used for the
    host copy and for the device slot, so one memcpy of `nbytes` moves the whole module."""

    places: tuple[TensorPlace, ...]
    nbytes: int  # end of the last tensor (not padded further: the copy moves exactly this much)

    @classmethod
    def of(cls, refs: Iterable[TensorRef]) -> ByteLayout:
        return cls.of_shapes((tuple(r.get().shape), r.get().dtype) for r in refs)

    @classmethod
    def of_shapes(cls, specs: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> ByteLayout:
        """The layout of tensors of these (shape, dtype), in order (for tensors not yet in that dtype)."""
        places, off = [], 0
        for shape, dtype in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            places.append(TensorPlace(off, n, dtype, tuple(shape)))
            off = align(off + n)
        end = places[-1].offset + places[-1].nbytes if places else 0
        return cls(tuple(places), end)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed, shaped views of a uint8 buffer (at least `nbytes` long), one per tensor, in ref order."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.nbytes:
            raise ValueError(f"need a 1-D uint8 buffer of at least {self.nbytes} bytes, got "
                             f"{buffer.dtype} {tuple(buffer.shape)}")
        return [buffer[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in self.places]


def pageable_allocator(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class PinnedHostMemory:
    """Allocator of page-locked host buffers. The GPU's copy engine reads pinned memory by DMA, so a
    non_blocking H2D copy from it is truly asynchronous (from pageable memory CUDA stages through a bounce
    buffer and blocks the host).

    Buffers are ordinary CPU allocations registered with cudaHostRegister, of exactly the size asked for:
    torch's pinned allocator (pin_memory=True) rounds each block up to a power of two, which would cost up to
    half again of a model's streamed bytes in locked RAM. close() unregisters them all (they stay valid as
    pageable memory); call it only once no copy reads them any more. Falls back to pin_memory=True where
    torch exposes no cudaHostRegister.
    """

    def __init__(self) -> None:
        self._registered: list[torch.Tensor] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        cudart = _cudart_with_register()
        if cudart is None or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=nbytes > 0)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        err = cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if err != cudart.cudaError.success:
            # Not retried with another allocator: the failed call leaves CUDA's last-error set, which the next
            # kernel launch check would report, so the process should not go on as if nothing happened.
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of host memory failed ({err}): not enough "
                               "lockable RAM for the streamed layers; stream fewer layers, or pass "
                               "host_allocator=placement.pageable_allocator (slower, synchronous copies)")
        self._registered.append(buf)
        return buf

    def close(self) -> None:
        cudart = _cudart_with_register()
        for buf in self._registered:
            cudart.cudaHostUnregister(buf.data_ptr())  # type: ignore[union-attr]
        self._registered.clear()


def _cudart_with_register():
    if not torch.cuda.is_available():
        return None
    cudart = torch.cuda.cudart()
    return cudart if hasattr(cudart, "cudaHostRegister") and hasattr(cudart, "cudaHostUnregister") else None


def file_backed_allocator(directory: str | Path) -> HostAllocator:
    """An allocator for models larger than RAM: each buffer is an mmap of a new file under `directory`,
    so the kernel pages layers in from disk as they are copied and out again under memory pressure.
    H2D copies from it are pageable (synchronous, slower); use it for the layers that do not fit pinned.

    The same hook can serve an mmap of the checkpoint itself once a checkpoint is written in ByteLayout
    order (one contiguous run per layer): allocate would then return the file's range for that layer.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1 << 62))

    def allocate(nbytes: int) -> torch.Tensor:
        path = root / f"layer-{next(counter):05d}.bin"
        # shared=True: writes go to the file (MAP_SHARED), so the pages are file-backed, not anonymous.
        return torch.from_file(str(path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]

    return allocate


def pack(refs: list[TensorRef], layout: ByteLayout, allocate: HostAllocator = pageable_allocator) -> torch.Tensor:
    """Copy the tensors of `refs` (wherever they live) into one new host buffer laid out as `layout`,
    and return it: uint8 (layout.nbytes,). The refs still point at their old tensors."""
    return pack_values([r.get() for r in refs], layout, allocate)


def pack_values(values: list[torch.Tensor], layout: ByteLayout, allocate: HostAllocator = pageable_allocator
                ) -> torch.Tensor:
    """pack() of plain tensors: each is copied (cast to its place's dtype) into one new host buffer."""
    buf = allocate(layout.nbytes)
    for t, view in zip(values, layout.views(buf)):
        view.copy_(t)
    return buf


def point_at(refs: list[TensorRef], views: list[torch.Tensor]) -> None:
    """Make the module compute from `views` (same order as refs): its old tensors are dropped."""
    for r, v in zip(refs, views):
        r.set(v)


# ------------------------------------------------------------------------------------------------------------
# Quantized modules on the CPU
# ------------------------------------------------------------------------------------------------------------


def is_quantized(module: nn.Module) -> bool:
    """A packed linear (QuantLinear and friends): anything that can hand back its PackedWeight through a
    packed() method, as QuantLinear does (quant/linear.py)."""
    return callable(getattr(module, "packed", None))


def dequantized_linear(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear on `device` in `dtype` computing what the packed `module` computes (weight
    dequantized in fp32 first, then cast, as the reference path of the packed formats does)."""
    packed = module.packed()  # type: ignore[operator]
    with torch.device("meta"):
        lin = nn.Linear(packed.in_features, packed.out_features, bias=getattr(module, "bias", None) is not None)
    lin.weight = nn.Parameter(packed.dequantize(torch.float32).to(device=device, dtype=dtype), requires_grad=False)
    if lin.bias is not None:
        bias = module.bias.detach()  # type: ignore[union-attr]
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin


def replace_packed_linears(root: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> int:
    """Swap every packed linear under `root` for convert(it). Returns how many."""
    swaps = [(name, m) for name, m in root.named_modules() if name and is_quantized(m)]
    for name, m in swaps:
        set_submodule(root, name, convert(m))
    return len(swaps)


def host_clone(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a shared module with its tensors on `device` (bit-identical values: copied, not rebuilt)."""
    clone = copy.deepcopy(module)
    move(owned_tensors(clone), device)
    return clone


def structural_copy(module: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> nn.Module:
    """A copy of `module`'s tree that copies no tensor data: every submodule is a new object of the same class
    with its plain attributes shared, its own parameter objects (on the same data) and buffer table, and no
    hooks; modules in `skip` (ids: the shared rotary table) are the same objects. Re-pointing the copy's
    tensors (point_at) then leaves the original untouched: the offload driver's device twin of a CPU layer."""
    if id(module) in skip:
        return module
    new = copy.copy(module)  # shallow: new __dict__, same values
    state = new.__dict__
    state["_parameters"] = {k: None if p is None else nn.Parameter(p.data, requires_grad=p.requires_grad)
                            for k, p in module._parameters.items()}
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {k: None if m is None else structural_copy(m, skip) for k, m in module._modules.items()}
    for name, value in list(state.items()):
        if "hooks" in name and isinstance(value, dict):  # forward/backward/state-dict hooks: the copy has none
            state[name] = type(value)()
    return new
