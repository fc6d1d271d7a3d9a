"""``FalqonLitModule``: thin Lightning glue around a FALQON-converted Hugging Face causal LM (docs/design.md §4).

The backbone's config and tokenizer are read in ``__init__`` (cheap, and the data module needs the tokenizer in
``setup``); weights are loaded and converted in ``configure_model``, which is idempotent. Only ``lora_B`` trains.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from falqon_lit.backbone import (
    compile_blocks,
    context_length,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_backbone,
)
from falqon_lit.checkpoint import RECORD_KEY, check_record, fp8_source_layers, model_record
from falqon_lit.config import FalqonConfig, InitMethod, plain_dict
from falqon_lit.convert import ConversionReport, convert_model
from falqon_lit.fused_block import apply_fused_block, fused_linear_cross_entropy
from falqon_lit.generation import generate_text
from falqon_lit.layer import falqon_layers
from falqon_lit.layer_base import FalqonLayer
from falqon_lit.optim import OptimConfig, build_optimizer, build_scheduler
from falqon_lit.prompts import IGNORE_INDEX
from falqon_lit.sharded import data_parallel_mesh, shard_falqon_model


def _coerce(value: Any, cls: type) -> Any:
    # Checkpoints saved outside the CLI store plain dicts; the CLI passes instances.
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


class FalqonLitModule(LightningModule):
    """Fine-tune a causal LM with FALQON's melded FP8 LoRA.

    Args:
        model: backbone: a local Hugging Face folder, a hub name (needs a network), a ``transformers`` config dict
            for a random model (``{"model_type": "llama", ...}``), or ``None`` for the embedded SmolLM2-135M-Instruct.
        tokenizer: tokenizer folder or hub name; defaults to the backbone's (SmolLM2's for config dicts).
        falqon: FALQON conversion: rank, targets, scaling, init, B policy, backend.
        optim: optimizer and learning-rate schedule of ``lora_B``.
        dtype: dtype the backbone's high-precision weights are loaded in (``float32``, ``bfloat16``, ``float16``).
        gradient_checkpointing: recompute decoder blocks in backward to save activation memory.
        compile: ``torch.compile`` each decoder block (the FP8 layers stay as they are); the first steps compile.
        fused_block: run projections that share an input as one FP8 GEMM, and on CUDA with Liger Kernel its
            rotary, RMSNorm, SwiGLU and a fused lm_head + cross-entropy (no full logits); ``False`` runs every
            layer alone and the block eagerly (for comparison).
        init_seed: seed of the random initialisation of config-dict backbones (independent of the global seed).
        sample_max_new_tokens: completion length of ``predict`` and of the before/after samples.
    """

    def __init__(
        self,
        model: str | dict[str, Any] | None = None,
        tokenizer: str | None = None,
        falqon: FalqonConfig | None = None,
        optim: OptimConfig | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        compile: bool = False,
        fused_block: bool = True,
        init_seed: int = 0,
        sample_max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.falqon_config: FalqonConfig = _coerce(falqon, FalqonConfig)
        self.optim_config: OptimConfig = _coerce(optim, OptimConfig)
        self.torch_dtype = parse_dtype(dtype)
        if sample_max_new_tokens <= 0:
            raise ValueError(f"--model.sample_max_new_tokens must be > 0, got {sample_max_new_tokens}")
        self.save_hyperparameters()
        if "_instantiator" not in self.hparams:
            # Saved hyperparameters must be plain values so that checkpoints load with torch.load(weights_only=True).
            # (Under LightningCLI they already are: the CLI saves its own config dump and re-parses it on load.)
            self.hparams["falqon"] = plain_dict(self.falqon_config)
            self.hparams["optim"] = plain_dict(self.optim_config)

        self.backbone = resolve_backbone(model, tokenizer)
        self.tokenizer = load_tokenizer(self.backbone)
        self.context_length = context_length(self.backbone.config)
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_decoder = compile  # not `self.compile`: that is nn.Module.compile
        self.fused_block = fused_block
        self.fused_loss = False
        """Whether the loss runs Liger's fused linear cross-entropy (decided in ``configure_model``)."""
        self.init_seed = init_seed
        self.sample_max_new_tokens = sample_max_new_tokens
        self.model: torch.nn.Module | None = None
        self.conversion: ConversionReport | None = None
        self.fp8_source_layers: list[str] = []
        """Layers the backbone's FP8 checkpoint import kept as stored (recorded in checkpoints, for rebuilding)."""

        num_classes = self.backbone.config.vocab_size
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)
        self.val_loss = MeanMetric()

    # ------------------------------------------------------------------------------------------------- model
    @override
    def on_train_start(self) -> None:
        # init: gradient leaves A random until a calibrating callback (RowwiseProxyUpdate) computes it: say so.
        gradient_init = any(layer.config.init == InitMethod.GRADIENT for layer in self.falqon_layers().values())
        if gradient_init and not any(getattr(cb, "calibrates_gradient_init", False) for cb in self.trainer.callbacks):
            rank_zero_warn(
                "init: gradient needs the RowwiseProxyUpdate callback to compute A when training starts; without "
                "it A stays random. Add falqon_lit.callbacks.RowwiseProxyUpdate() or set init: SVD or RANDOM",
            )

    @override
    def configure_model(self) -> None:
        """Load (or randomly build) the backbone and convert it; a second call does nothing."""
        if self.model is not None:
            return
        model = load_model(self.backbone, self.torch_dtype, self.init_seed)
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        self.fp8_source_layers = fp8_source_layers(model)
        # Row-sharded FP8 weights (ModelParallelStrategy) are per-layer: projections there run alone.
        group = self.fused_block and self.device_mesh is None
        self.conversion = convert_model(model, self.falqon_config, group_projections=group)
        if self.fused_block:
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            self.fused_loss, description = apply_fused_block(model, device)
            rank_zero_info(description)
        if self.gradient_checkpointing:
            # transformers >= 5.2x names it activation checkpointing (the old name warns FutureWarning).
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if self.compile_decoder:
            rank_zero_info(f"torch.compile: {compile_blocks(model)} decoder blocks (compiled on the first steps)")
        self.model = model
        # DDP must not broadcast buffers every step: they are the whole FP8 model, identical on every rank by
        # construction (callbacks.ReplicaConsistencyCheck verifies it). Only lora_B gradients are all-reduced.
        self._ddp_params_and_buffers_to_ignore = [f"model.{name}" for name, _ in model.named_buffers()]
        if self.device_mesh is not None:  # ModelParallelStrategy: shard the FP8 rows over the data-parallel ranks
            shard_falqon_model(model, data_parallel_mesh(self.device_mesh))
        rank_zero_info(self.conversion.summary())

    def model_record(self, full: bool = False) -> dict[str, Any]:
        """The record that identifies this module's model in checkpoints (``full``: with layer shapes and tokenizer
        files, which make the checkpoint loadable without the model folder; see ``falqon_lit.checkpoint``)."""
        return model_record(
            self.backbone.config,
            self.falqon_config,
            self.torch_dtype,
            source=self.backbone.weights,
            model=self.model if full else None,
            tokenizer=self.tokenizer if full else None,
            fp8_layers=self.fp8_source_layers,
        )

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = self.model_record(full=True)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint of another model must not silently replace the configured one (it would load, shapes allowing).
        check_record("checkpoint", checkpoint, self.model_record())

    @override
    def on_train_end(self) -> None:
        # After every callback's on_train_end, so after RowwiseProxyUpdate's final flush: the saved state is the
        # trained model as exported. Checkpoints written at validation hold unmerged rows of B.
        callback = self.trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return
        path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        self.trainer.save_checkpoint(path, weights_only=False)  # with optimizer state: resumable
        rank_zero_info(f"final checkpoint (after the flush): {path}")

    def falqon_layers(self) -> dict[str, FalqonLayer]:
        """The FALQON layers by name (empty before ``configure_model``)."""
        return {} if self.model is None else falqon_layers(self.model)

    # ------------------------------------------------------------------------------------------------- steps
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)``.

        With ``position_ids`` (packed rows, ``falqon_lit.packing``) the model gets no 2-D mask: ``transformers``
        then derives a block-diagonal causal mask from where the positions restart (its packed-sequence convention),
        and ``attention_mask`` only marks real tokens for counting.
        """
        if position_ids is not None:
            return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def loss_and_predictions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy over trained tokens, the argmax predictions and shifted labels.

        The mean runs over every trained token of the batch, whatever the rows hold, so a packed batch has the loss
        of the same conversations unpacked (tests/test_packing.py).

        Returns:
            ``(loss, preds (N,), targets (N,))`` with ``targets == -100`` where nothing is trained.
        """
        ids, mask, positions = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
        if self.fused_loss:
            return fused_linear_cross_entropy(self.model, ids, mask, positions, batch["labels"], IGNORE_INDEX)
        logits = self(ids, mask, positions)
        logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
        targets = batch["labels"][:, 1:].reshape(-1)  # (B*(T-1),)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        return loss, logits.argmax(dim=-1), targets

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, preds, targets = self.loss_and_predictions(batch)
        self.train_acc(preds, targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        self.log("train/acc", self.train_acc)
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, preds, targets = self.loss_and_predictions(batch)
        # Token-weighted mean, so the epoch loss does not depend on how sequences were batched.
        self.val_loss.update(loss, weight=(targets != IGNORE_INDEX).sum())
        self.val_acc(preds, targets)
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        self.log(f"{stage}/acc", self.val_acc)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, stage: str) -> None:
        # compute() before Lightning resets the metric at epoch end; exp of the token-weighted mean loss.
        self.log(f"{stage}/ppl", self.val_loss.compute().exp())

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        completions = self.generate(batch["prompt"])
        return [{"prompt": p, "completion": c} for p, c in zip(batch["prompt"], completions, strict=True)]

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy completions of rendered prompts (see ``InstructionDataModule.sample_prompts``)."""
        return generate_text(self.model, self.tokenizer, prompts, max_new_tokens or self.sample_max_new_tokens)

    # ------------------------------------------------------------------------------------------- optimization
    @override
    def configure_optimizers(self) -> dict[str, Any]:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # Invariant of convert_model: the adapter matrices are the only trainable tensors.
        assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n, _ in params), [n for n, _ in params]
        optimizer = build_optimizer([p for _, p in params], self.optim_config)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(optimizer, self.optim_config, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
