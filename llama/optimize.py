"""Making a loaded model fast for inference: fused projections, prepacked or direct linear kernels, and a decode
step compiled with torch.compile. Each changes how the model computes, never what (see docs/performance.md)."""

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from .kernels import PACK_BLOCK_BYTES, DirectLinear, as_rank_linear, packing_for
from .model import Transformer
from .pages import file_mapped

Release = Optional[Callable[[torch.Tensor], None]]
# Loads the weights of a module named by a prefix (see convert_linear_layers).
Load = Optional[Callable[[nn.Module, str], None]]


@contextlib.contextmanager
def skip_weight_init():
    """Build fairscale layers without initializing their weights, for weights that get loaded anyway: fairscale
    fills a rank's weight from a full-size master matrix, which costs time and memory and cannot work on the meta
    device."""
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


def linear_layers(model: Transformer) -> List[nn.Module]:
    """The bias-free fairscale linear layers of `model` not yet converted to another class."""
    return [m for m in model.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear) and m.bias is None]


def _fused(parent: nn.Module, names: List[str], release: Release) -> nn.Module:
    """One column-parallel layer in place of the layers `names` of `parent` (removed), computing their outputs
    side by side: each of its parameters and buffers stacks the layers' rows."""
    layers = [getattr(parent, name) for name in names]
    fused = layers[0]
    for name, tensor in [*fused.named_parameters(recurse=False), *fused.named_buffers(recurse=False)]:
        parts = [getattr(layer, name).detach() for layer in layers]
        stacked = torch.cat(parts)
        for part in parts if release is not None else []:
            release(part)
        if isinstance(tensor, nn.Parameter):
            setattr(fused, name, nn.Parameter(stacked, requires_grad=False))
        else:
            setattr(fused, name, stacked)
    for name in names:
        delattr(parent, name)
    return fused


def fuse_block(layer: nn.Module, release: Release = None) -> None:
    """Make the TransformerBlock `layer`'s wq, wk, wv one layer `attention.wqkv` and its w1, w3 one layer
    `feed_forward.w13`: one matrix product each instead of three and two. The fused layer's weight (and any other
    per-row tensor, such as int8 scales) stacks a rank's rows of each. `release`, if given, is called on the
    originals once copied."""
    attention, feed_forward = layer.attention, layer.feed_forward
    attention.wqkv = _fused(attention, ["wq", "wk", "wv"], release)
    feed_forward.w13 = _fused(feed_forward, ["w1", "w3"], release)


def fuse_projections(model: Transformer, release: Release = None) -> None:
    """Fuse the projections of every block of `model` (see fuse_block)."""
    for layer in model.layers:
        fuse_block(layer, release)


def row_blocks(weight: torch.Tensor, rows: int, release: Release = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """(first row, block) for each block of `rows` rows of `weight`, each `release`d (if given) once the loop
    has used it: converting a weight this way needs one block's temporaries, and frees its source as it goes."""
    for begin in range(0, weight.shape[0], rows):
        block = weight[begin : begin + rows]
        yield begin, block
        if release is not None:
            release(block)


Convert = Callable[[nn.Module, torch.Tensor, Release], None]


def convert_linear_layers(
    model: Transformer, convert: Convert, release: Release = None, load: Load = None
) -> None:
    """Call `convert(layer, weight, release)` on every linear layer, which must then compute with `weight` in its own
    way and pass each block of rows of `weight` to `release` (if not None) once used; one block at a time, its
    projections fused first (see fuse_block), then the output projection. `release`, if given, frees memory no
    longer needed; a tied output projection's weight, the embedding, gets it only where its pages read back from
    a file (see llama.pages.file_mapped). `load(module, prefix)`, if given, first loads the weights of each block
    (`layers.N.`) and then of the output projection (`output.`), for models loaded as they are converted: only
    one block's unconverted weights are then held at a time."""
    tied = model.output_is_tied()
    parts = [(f"layers.{i}.", layer) for i, layer in enumerate(model.layers)]
    for prefix, module in [*parts, ("output.", model.output)]:
        if load is not None:
            load(module, prefix)
        if module is not model.output:
            fuse_block(module, release)
        for linear in linear_layers(module):
            weight = linear.weight.detach()
            del linear.weight
            shared = tied and linear is model.output and not file_mapped(weight)
            convert(linear, weight, None if shared else release)


def _pack(module: nn.Module, kernel: type, release: Release) -> None:
    """Make the fairscale linear `module` one computing with its weight through `kernel` (a PackedLinear), packed
    a block of rows at a time, each block `release`d (if given) once packed."""
    weight = module.weight.detach()
    del module.weight
    rows = max(1, PACK_BLOCK_BYTES // (weight.shape[1] * weight.element_size()))
    module.blocks = [kernel.pack_block(block) for _, block in row_blocks(weight, rows, release)]
    as_rank_linear(module, kernel)


def optimize_for_inference(model: Transformer, release: Release = None, *, traceable: bool = False) -> None:
    """Fuse the projections and give every linear layer the fastest unquantized kernel: prepacked where
    `packing_for` has one that pays off at this max_batch_size (see PackedLinear), else F.linear without
    fairscale's wrappers on a single rank (DirectLinear); with `traceable`, only kernels torch.compile can trace.
    A tied output projection stays DirectLinear, so the embedding is held once. `release(weight)`, if given, is
    called on each weight once packed: the weights are then this model's alone, and it may free their memory."""
    fuse_projections(model, release)
    weight = model.tok_embeddings.weight
    kernel = packing_for(weight.dtype, weight.device)
    if kernel is not None and (
        (traceable and not kernel.traceable) or model.params.max_batch_size < kernel.min_batch_size(weight.dtype)
    ):
        kernel = None
    tied = model.output_is_tied()
    packed = []
    for module in linear_layers(model):
        if kernel is not None and kernel.fits(module.weight) and not (tied and module is model.output):
            packed.append(module)
        else:  # the same weight, still in use (a tied output's is the embedding): nothing to release
            as_rank_linear(module, DirectLinear)
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:  # packing runs outside the GIL
        list(pool.map(lambda module: _pack(module, kernel, release), packed))


def compile_decoding(model: Transformer, *, autotune: bool = False) -> None:
    """Run decode steps of a single sequence through torch.compile, which fuses the small operations around the
    matrix products. The position is a dynamic size, so one graph serves every position; inductor caches it on
    disk for later processes. Batches stay eager: a batch shrinking to one sequence would compile a second graph
    mid-generation.

    The weights stay graph inputs (packed ones through the operator llama::onednn_linear, plain 16-bit ones through
    llama::matrix_vector), except with `autotune`, for int8 and int4 weights: inductor then freezes them into the
    graph and times its own matrix kernels against torch's, keeping the faster."""
    import torch._inductor.config as inductor_config

    if fs_init.get_model_parallel_world_size() > 1:
        raise ValueError("compiling needs a single process: run without torchrun or leave compile off")
    compiled = torch.compile(model.decode_step, fullgraph=True)
    if autotune:  # inductor's settings are read when compiling, at the first call
        compiled = inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")(
            compiled
        )
    model.compiled_step = compiled


def warm_up_decoding(model: Transformer) -> None:
    """Run one decode step now, so that a compiled step compiles here rather than in the middle of the first
    answer. It writes positions 0 and 1 of the caches' first row, which every generation writes before it reads."""
    token = torch.zeros((1, 1), dtype=torch.long, device=model.rope.device)
    for position in range(min(2, model.params.max_seq_len)):  # a prompt token, then a decode step if it fits
        model.forward(token, position)
