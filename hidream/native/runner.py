"""ComfyUI's HiDream forward, cut at the same hook points as the pack's own runner.

``comfy.ldm.hidream.model.HiDreamImageTransformer2DModel._forward`` runs all its blocks in
one loop and offers no block-level patch point; its whole forward runs through the
DIFFUSION_MODEL wrapper. ``NativeRunner`` gives the cache policies (``hidream.cache.policy``) the
interface of ``hidream.forward.runner.TransformerRunner`` (``prepare`` -> ``run_blocks`` ->
``finish``) over ComfyUI's own modules, doing the same operations in the same order as
``_forward``, so a policy that runs every block returns ComfyUI's output bit for bit (tested).
It reads ComfyUI's module at call time and keeps no per-call state.

Its one difference: each block's MoE runs the pack's sync-free grouped layout
(``hidream.forward.moe``). ComfyUI's ``MOEFeedForwardSwiGLU`` indexes its tokens with a boolean
mask per expert: data-dependent shapes, a host sync each on a GPU (96 a forward on the
benchmark model) and a graph break for ``torch.compile``. Its routing is diffusers' (softmax
gate, top-2 of 4, no renormalisation, shared expert added), so the same layout serves it, and
on the CPU in fp32 it returns ComfyUI's MoE bit for bit (tested over whole sampling runs): each
expert multiplies the same rows in the same order, and the weighted picks are added in the same
pairs. Its CPU cost is ComfyUI's (0.94-1.04x across runs and sizes, within this machine's
noise); what it buys is no host sync and a block graph that compiles whole. It runs only where
it computes exactly what ComfyUI's layers would (``forward.moe._plain_linear`` recognises
ComfyUI's ``Linear`` while it casts and patches nothing); fp8 or manual-cast weights, lowvram
LoRA patches (``weight_function``), hooks, or another device/dtype run ComfyUI's own MoE.

``WholeModel`` is the same forward seen from outside: one "block" from the model's input
latent to its output latent. TeaCache alone on Full (which watches only the timestep
embedding) is driven through it, so its cached residual is the whole model's output change
``out - x`` and a skipped call costs the timestep embedder and one add, as core EasyCache's
skip does (``hidream.native.cache`` says when it is used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..forward.moe import StaticMoE
from ..forward.runner import BlockRunner, ForwardContext


@dataclass
class NativeContext(ForwardContext):
    """``ForwardContext`` plus what ComfyUI's forward needs to finish (the crop and options).

    The text streams and rope (``txt``, ``llama``, ``rope``) are computed on first use, so a
    call that TeaCache skips whole never pays for the caption projections and the rope: like
    core EasyCache, it then costs only the embedders it watches and the final layer."""

    size: tuple[int, int] = (0, 0)  # (h, w) of the latent before padding to the patch size
    img_sizes: list = field(default_factory=list)
    transformer_options: dict = field(default_factory=dict)
    text_fn: Callable[[], tuple] | None = None  # -> (txt, llama, rope), called at most once


def _lazy(name: str) -> property:
    key = "_" + name

    def get(self):
        if self.__dict__.get(key) is None and self.text_fn is not None:
            fn, self.text_fn = self.text_fn, None
            txt, llama, rope = fn()
            self.__dict__.update(_txt=txt, _llama=llama, _rope=rope)
        return self.__dict__.get(key)

    def put(self, value) -> None:
        self.__dict__[key] = value

    return property(get, put)


NativeContext.txt = _lazy("txt")
NativeContext.llama = _lazy("llama")
NativeContext.rope = _lazy("rope")


class NativeRunner(BlockRunner):
    """Runs ComfyUI's ``HiDreamImageTransformer2DModel`` block by block (see the module doc)."""

    def __init__(self, model: torch.nn.Module, moe: str | None = "grouped", compile: str = "off") -> None:
        """``moe``: ``grouped`` runs the pack's sync-free MoE where it is exact
        (module doc), None ComfyUI's own MoE everywhere. ``compile``: ``off`` or
        ``blocks`` (regional compile of ComfyUI's blocks, ``hidream.forward.compile``)."""
        if moe not in ("grouped", None):
            raise ValueError(f"moe: got {moe!r}; allowed: 'grouped' or None")
        super().__init__(model, compile)
        self.model = model
        # grouped where it is exact, ComfyUI's own MoE elsewhere (the module doc)
        self._moe = StaticMoE(self._blocks, "grouped", "diffusers") if moe else None

    def timestep_embedding(self, t, batch: int, x: torch.Tensor) -> torch.Tensor:
        """ComfyUI's ``t_embedder`` on ``t`` broadcast to ``batch`` rows, in ``x``'s dtype."""
        m = self.model
        return m.t_embedder(m.expand_timesteps(t, batch, x.device), x.dtype)

    def prepare(
        self, x, t, y, context, llama, image_cond=None, transformer_options=None, t_emb=None
    ) -> NativeContext:
        """The first half of ComfyUI's ``_forward`` (text streams and rope on first use).
        ``t_emb``: the timestep embedding when the caller already has it (``WholeModel``)."""
        import comfy.ldm.common_dit

        m = self.model
        _, _, h, w = x.shape
        if image_cond is not None:
            x = torch.cat([x, image_cond], dim=-1)
        hidden = comfy.ldm.common_dit.pad_to_patch_size(x, (m.patch_size, m.patch_size))
        batch = hidden.shape[0]
        if t_emb is None:
            t_emb = self.timestep_embedding(t, batch, hidden)
        temb = t_emb + m.p_embedder(y)
        hidden, masks, img_sizes = m.patchify(hidden, m.max_seq, None)
        if masks is not None:  # only for list inputs, which ComfyUI's sampling never passes
            raise ValueError("HiDream native cache: padded (masked) image tokens are not supported")
        ph, pw = img_sizes[0]
        img_ids = torch.zeros(ph, pw, 3, device=hidden.device)
        img_ids[..., 1] = img_ids[..., 1] + torch.arange(ph, device=hidden.device)[:, None]
        img_ids[..., 2] = img_ids[..., 2] + torch.arange(pw, device=hidden.device)[None, :]
        img_ids = img_ids.reshape(1, ph * pw, 3).repeat(batch, 1, 1)
        img = m.x_embedder(hidden)
        dim = img.shape[-1]

        def text() -> tuple:
            layers = llama.movedim(1, 0)
            enc = [
                m.caption_projection[i](layers[k]).view(batch, -1, dim) for i, k in enumerate(m.llama_layers)
            ]
            t5 = m.caption_projection[-1](context).view(batch, -1, dim)
            txt_ids = torch.zeros(
                batch,
                t5.shape[1] + enc[-1].shape[1] + enc[0].shape[1],
                3,
                device=img_ids.device,
                dtype=img_ids.dtype,
            )
            rope = m.pe_embedder(torch.cat((img_ids, txt_ids), dim=1))
            return torch.cat([t5, enc[-1]], dim=1), enc, rope

        return NativeContext(
            img=img,
            txt=None,
            temb=temb,
            llama=None,
            rope=None,
            grid=(ph, pw),
            batch=batch,
            t_emb=t_emb,
            size=(h, w),
            img_sizes=img_sizes,
            transformer_options=transformer_options if transformer_options is not None else {},
            text_fn=text,
        )

    def call_block(
        self, idx: int, ctx: NativeContext, tokens: torch.Tensor, text: torch.Tensor | None = None
    ):
        """ComfyUI's block ``idx`` (flat index): double on the image tokens and ``text``, single on
        the joined streams (``text`` None); see ``forward.runner.BlockRunner``."""
        return self._call(
            idx,
            image_tokens=tokens,
            image_tokens_masks=None,
            text_tokens=text,
            adaln_input=ctx.temb,
            rope=ctx.rope,
            transformer_options=ctx.transformer_options,
        )

    def finish(self, ctx: NativeContext, img: torch.Tensor) -> torch.Tensor:
        """Final layer, unpatchify, crop and negate, as the end of ComfyUI's ``_forward``."""
        out = self.model.unpatchify(self.model.final_layer(img, ctx.temb), ctx.img_sizes)
        h, w = ctx.size
        return -out[:, :, :h, :w]

    def forward(
        self, x, t, y, context, llama, image_cond=None, transformer_options=None, policy=None, t_emb=None
    ):
        ctx = self.prepare(x, t, y, context, llama, image_cond, transformer_options, t_emb)
        if policy is None:
            img, _ = self.run_blocks(ctx, 0, self.num_blocks, ctx.img, ctx.txt)
        else:
            img = policy(self, ctx)
        return self.finish(ctx, img)


@dataclass
class InputContext(ForwardContext):
    """``WholeModel``'s context: ``img`` is the model's input latent, ``t_emb`` (and ``temb``)
    the timestep embedding, ``txt`` and ``rope`` the batch's row indices.

    The row indices ride in stream slots because a policy that runs some lanes and skips
    others cuts every stream of the context to the computing rows (``hidream.cache.policy._restrict``);
    ``WholeModel.run_blocks`` reads the cut indices to take the same rows of ``inputs``."""

    inputs: tuple = ()  # (x, t, y, context, llama, image_cond) of the whole batch, uncut
    transformer_options: dict = field(default_factory=dict)


class WholeModel:
    """The whole ComfyUI forward as one block, for a policy that only ever skips all of it.

    ``run_blocks(ctx, 0, num_blocks, x, rows)`` returns the model output for those input rows,
    so the policy's cached residual is ``out - x``, a skip returns ``x + residual`` and there is
    nothing to finish. ``num_blocks`` stays the real count: the telemetry counts block calls."""

    def __init__(self, runner: NativeRunner) -> None:
        self.runner = runner
        self.num_double = runner.num_double
        self.num_blocks = runner.num_blocks

    def prepare(self, x, t, y, context, llama, image_cond=None, transformer_options=None) -> InputContext:
        """Only what a skip decision reads: the timestep embedding (and the input itself)."""
        batch = x.shape[0]
        t = self.runner.model.expand_timesteps(t, batch, x.device)
        t_emb = self.runner.timestep_embedding(t, batch, x)
        rows = torch.arange(batch, device=x.device)
        return InputContext(
            img=x,
            txt=rows,
            temb=t_emb,
            llama=[],
            rope=rows,
            grid=(0, 0),
            batch=batch,
            t_emb=t_emb,
            inputs=(x, t, y, context, llama, image_cond),
            transformer_options=transformer_options if transformer_options is not None else {},
        )

    def run_blocks(self, ctx: InputContext, start: int, end: int, img: torch.Tensor, txt: torch.Tensor):
        """The model output for input rows ``txt`` (all of them, or the rows the policy cut to)."""
        if (start, end) != (0, self.num_blocks):
            raise ValueError(f"WholeModel runs the whole model only, not blocks {start}..{end - 1}")
        inputs = ctx.inputs
        if txt.numel() != inputs[0].shape[0]:
            inputs = tuple(_rows(v, txt, inputs[0].shape[0]) for v in inputs)
        x, t, y, context, llama, image_cond = inputs
        out = self.runner.forward(
            x, t, y, context, llama, image_cond, ctx.transformer_options, t_emb=ctx.t_emb
        )
        return out, txt


def _rows(value, index: torch.Tensor, batch: int):
    """Rows ``index`` of a per-row input; anything else (None, shared tensors) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, index)
    return value
