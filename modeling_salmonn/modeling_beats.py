"""
BEATs audio encoder (Chen et al., 2022) as used by SALMONN: the transformer that maps a normalised Kaldi fbank to
patch features. Only the feature path of the original `BEATs.extract_features(..., feature_only=True)` is ported; the
AudioSet head, the acoustic tokenizer and the quantizer are not part of this model.

The fbank itself is computed by `SalmonnFeatureExtractor`, so `BeatsModel` takes `[batch, frames, mel_bins]`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_salmonn import BeatsConfig


# The original computes the fbank with 128 mel bins (hard-coded in `BEATs.preprocess`).
BEATS_NUM_MEL_BINS = 128

# The original attention divides the scaled queries by this constant, subtracts the row maximum of the scores and
# multiplies back: the same softmax as plain scaled dot products, but safe from half-precision overflow.
_ATTENTION_SCORE_ALPHA = 32.0


class _GradMultiply(torch.autograd.Function):
    """Identity in the forward pass, scales the gradient in the backward pass (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return hidden_states.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _gelu_fp32(hidden_states: torch.Tensor) -> torch.Tensor:
    # The original evaluates GELU in float32 whatever the working dtype.
    return F.gelu(hidden_states.float()).type_as(hidden_states)


def _gelu_tanh(hidden_states: torch.Tensor) -> torch.Tensor:
    return F.gelu(hidden_states, approximate="tanh")


_ACTIVATIONS = {
    "gelu": _gelu_fp32,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda hidden_states: hidden_states,
}


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """
    Bidirectional T5-style buckets of `key - query` offsets: half of the buckets for positive offsets, exact buckets
    for small distances and logarithmic ones up to `max_distance`, as in the original BEATs attention.
    """
    num_buckets = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Distances below `max_exact` take the exact branch; clamping keeps log() finite on the unused entries.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


class BeatsPositionalConvEmbedding(nn.Module):
    """Grouped convolution over the token sequence with weight norm, trimmed to the input length, then GELU."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.conv = nn.Conv1d(
            config.encoder_embed_dim,
            config.encoder_embed_dim,
            kernel_size=config.conv_pos,
            padding=config.conv_pos // 2,
            groups=config.conv_pos_groups,
        )
        self.conv = nn.utils.parametrizations.weight_norm(self.conv, name="weight", dim=2)
        # An even kernel with padding k // 2 yields one extra step at the end ("SamePad" in the original).
        self.num_pad_remove = 1 if config.conv_pos % 2 == 0 else 0
        self.activation = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv(hidden_states.transpose(1, 2))
        if self.num_pad_remove > 0:
            hidden_states = hidden_states[:, :, : -self.num_pad_remove]
        return self.activation(hidden_states).transpose(1, 2)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The original BEATs score computation: queries pre-divided by a constant, the row maximum subtracted and the
    constant multiplied back before the additive mask (relative position bias and key padding) and the softmax.
    """
    scores = torch.matmul(query * scaling / _ATTENTION_SCORE_ALPHA, key.transpose(-1, -2))
    scores = (scores - scores.amax(dim=-1, keepdim=True)) * _ATTENTION_SCORE_ALPHA
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1).type_as(scores)
    weights = F.dropout(weights, p=dropout, training=module.training)
    attn_output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return attn_output, weights


class BeatsAttention(nn.Module):
    """Multi-head self-attention with the shared relative position bias, gated per query (`gru_rel_pos`)."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"`encoder_embed_dim` ({self.embed_dim}) must be divisible by `encoder_attention_heads` "
                f"({self.num_heads})"
            )
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False

        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

        self.gru_rel_pos = config.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def _attention_bias(
        self, query: torch.Tensor, position_bias: torch.Tensor | None, key_padding_bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """
        The additive attention mask: `position_bias` [heads, q, k] scaled per query by a gate computed from the
        unscaled query heads, plus `key_padding_bias`. Built in one pass over the `[batch, heads, q, k]` result
        (`addcmul`): this mask is the largest tensor of the layer. The padding bias is 0 or -inf, so adding it inside
        `addcmul` gives the same numbers as adding it afterwards.
        """
        if key_padding_bias is not None:
            key_padding_bias = key_padding_bias.to(query.dtype)
        if position_bias is None:
            return key_padding_bias
        position_bias = position_bias.unsqueeze(0)
        if not self.gru_rel_pos:
            bias = position_bias if key_padding_bias is None else position_bias + key_padding_bias
            return bias.to(query.dtype)
        batch_size, num_heads, seq_len, _ = query.shape
        gates = self.grep_linear(query).view(batch_size, num_heads, seq_len, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        if key_padding_bias is None:
            return (gate * position_bias).to(query.dtype)
        return torch.addcmul(key_padding_bias, gate, position_bias).to(query.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        `position_bias` is the shared `[heads, T, T]` relative position bias, `key_padding_bias` an additive
        `[batch, 1, 1, T]` mask (0 for real keys, -inf for padding).
        """
        batch_size, seq_len, _ = hidden_states.shape
        head_shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)

        attention_mask = self._attention_bias(query, position_bias, key_padding_bias)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, self.embed_dim)
        return self.out_proj(attn_output)


class BeatsEncoderLayer(GradientCheckpointingLayer):
    """Transformer layer: post-LN with DeepNet residual scaling (the released models) or pre-LN."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        embed_dim = config.encoder_embed_dim
        self.self_attn = BeatsAttention(config)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.activation_dropout)
        self.dropout3 = nn.Dropout(config.dropout)
        self.layer_norm_first = config.layer_norm_first
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        if config.activation_fn not in _ACTIVATIONS:
            raise ValueError(
                f"`activation_fn` {config.activation_fn!r} is not supported by BeatsModel; expected one of "
                f"{sorted(_ACTIVATIONS)}"
            )
        self.activation_fn = _ACTIVATIONS[config.activation_fn]
        self.fc1 = nn.Linear(embed_dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.deep_norm_alpha = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout2(self.activation_fn(self.fc1(hidden_states)))
        return self.dropout3(self.fc2(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.layer_norm_first:
            attn = self.self_attn(self.self_attn_layer_norm(hidden_states), position_bias, key_padding_bias)
            hidden_states = hidden_states + self.dropout1(attn)
            return hidden_states + self._feed_forward(self.final_layer_norm(hidden_states))

        attn = self.self_attn(hidden_states, position_bias, key_padding_bias)
        hidden_states = self.self_attn_layer_norm(hidden_states * self.deep_norm_alpha + self.dropout1(attn))
        feed_forward = self._feed_forward(hidden_states)
        return self.final_layer_norm(hidden_states * self.deep_norm_alpha + feed_forward)


class BeatsEncoder(nn.Module):
    """Convolutional position embedding, then the layers; the relative position bias table is shared by all."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.config = config
        self.pos_conv_embed = BeatsPositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.encoder_embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        if config.relative_position_embedding:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, config.encoder_attention_heads)
        else:
            self.relative_attention_bias = None
        self.layers = nn.ModuleList([BeatsEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.gradient_checkpointing = False

    def compute_position_bias(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        """Relative position bias `[heads, seq_len, seq_len]`, computed once per forward for all layers."""
        # Buckets come from a float32 log on the CPU, as in the original, so that bucket edges never depend on the
        # device; only the 2 * seq_len - 1 distinct offsets are bucketed.
        offsets = torch.arange(1 - seq_len, seq_len, dtype=torch.long, device="cpu")
        offset_buckets = relative_position_bucket(offsets, self.config.num_buckets, self.config.max_distance)
        # The input's device, not the weight's: an offloaded table lives on "meta" until its hook loads it.
        device = device if device is not None else self.relative_attention_bias.weight.device
        positions = torch.arange(seq_len, device=device)
        index = positions[None, :] - positions[:, None] + (seq_len - 1)
        buckets = offset_buckets.to(device)[index]
        # Contiguous once here: every layer reads it whole, and a strided read makes each layer's gating 2x slower.
        return self.relative_attention_bias(buckets).permute(2, 0, 1).contiguous()

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        key_padding_bias = None
        if key_padding_mask is not None:
            # Padded tokens must not leak into real ones through the positional convolution, nor be attended to.
            hidden_states = hidden_states.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
            key_padding_bias = torch.zeros_like(key_padding_mask, dtype=hidden_states.dtype)
            key_padding_bias = key_padding_bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        hidden_states = hidden_states + self.pos_conv_embed(hidden_states)
        if not self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        position_bias = None
        if self.relative_attention_bias is not None:
            position_bias = self.compute_position_bias(hidden_states.shape[1], hidden_states.device)
            position_bias = position_bias.to(hidden_states.device, hidden_states.dtype)

        all_hidden_states = () if output_hidden_states else None
        decay = self.config.layer_wise_gradient_decay_ratio
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if decay != 1.0 and torch.is_grad_enabled() and hidden_states.requires_grad:
                hidden_states = _GradMultiply.apply(hidden_states, decay)
            if self.training and self.config.encoder_layerdrop > 0.0:
                if torch.rand([]).item() <= self.config.encoder_layerdrop:
                    continue
            hidden_states = layer(hidden_states, position_bias, key_padding_bias)

        if self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class BeatsPreTrainedModel(PreTrainedModel):
    config: BeatsConfig
    config_class = BeatsConfig
    base_model_prefix = "beats"
    main_input_name = "input_values"
    input_modalities = "audio"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BeatsEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Follows the original initialisation (BERT-style normal for linear and embedding weights).
        super()._init_weights(module)
        config = self.config
        if isinstance(module, BeatsPositionalConvEmbedding):
            weight = module.conv.parametrizations.weight
            conv = module.conv
            std = math.sqrt(4.0 / (conv.kernel_size[0] * conv.in_channels))
            init.normal_(weight.original1, mean=0.0, std=std)
            init.copy_(weight.original0, torch.norm_except_dim(weight.original1, 2, 2))
            init.zeros_(conv.bias)
        elif isinstance(module, BeatsAttention) and module.gru_rel_pos:
            init.ones_(module.grep_a)
        elif isinstance(module, BeatsEncoderLayer) and config.deep_norm:
            beta = (8 * config.encoder_layers) ** -0.25
            init.xavier_normal_(module.self_attn.q_proj.weight, gain=1.0)
            init.xavier_normal_(module.self_attn.k_proj.weight, gain=1.0)
            init.xavier_normal_(module.self_attn.v_proj.weight, gain=beta)
            init.xavier_normal_(module.self_attn.out_proj.weight, gain=beta)
            init.xavier_normal_(module.fc1.weight, gain=beta)
            init.xavier_normal_(module.fc2.weight, gain=beta)


class BeatsModel(BeatsPreTrainedModel):
    """
    The BEATs encoder without its AudioSet head. With an all-real (or absent) `attention_mask` the output equals the
    original `extract_features(..., feature_only=True)`. With padding, unlike the original, the patch mask is aligned
    with the time-major patch order, so each row of a padded batch equals the same clip encoded alone on its patches.
    """

    def __init__(self, config: BeatsConfig):
        super().__init__(config)
        if config.deep_norm and config.layer_norm_first:
            raise ValueError("BEATs cannot combine `deep_norm` with `layer_norm_first`")
        if config.input_patch_size <= 0:
            raise ValueError(f"`input_patch_size` must be positive, got {config.input_patch_size}")
        self.patch_embedding = nn.Conv2d(
            1,
            config.embed_dim,
            kernel_size=config.input_patch_size,
            stride=config.input_patch_size,
            bias=config.conv_bias,
        )
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        if config.embed_dim != config.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(config.embed_dim, config.encoder_embed_dim)
        else:
            self.post_extract_proj = None
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = BeatsEncoder(config)
        self.post_init()

    def _frame_patch_mask(self, attention_mask: torch.Tensor, frequency_patches: int) -> torch.Tensor:
        patch = self.config.input_patch_size
        batch_size, num_frames = attention_mask.shape
        time_patches = num_frames // patch
        blocks = attention_mask[:, : time_patches * patch].reshape(batch_size, time_patches, patch).bool().all(-1)
        # Patch p = t * frequency_patches + f: every frequency band of a time block shares its mask.
        blocks = blocks.unsqueeze(-1).expand(batch_size, time_patches, frequency_patches)
        return blocks.reshape(batch_size, time_patches * frequency_patches).long()

    def get_patch_attention_mask(self, attention_mask: torch.Tensor) -> torch.LongTensor:
        """
        `[batch, patches]` mask: 1 where the patch's whole block of `input_patch_size` frames is real, in the
        time-major patch order of the output (patch index `t * 8 + f` for 128 mel bins).
        """
        if attention_mask.dim() != 2:
            raise ValueError(f"`attention_mask` must be [batch, frames], got shape {tuple(attention_mask.shape)}")
        frequency_patches = BEATS_NUM_MEL_BINS // self.config.input_patch_size
        return self._frame_patch_mask(attention_mask, frequency_patches)

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        r"""
        input_values (`torch.FloatTensor` of shape `(batch_size, frames, mel_bins)`):
            Normalised Kaldi fbank from `SalmonnFeatureExtractor` (`(fbank - fbank_mean) / (2 * fbank_std)`).
        attention_mask (`torch.Tensor` of shape `(batch_size, frames)`, *optional*):
            1 for real fbank frames, 0 for padding. Patches that touch padding are excluded as attention keys and
            zeroed before the positional convolution; see `get_patch_attention_mask`.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_values.dim() != 3:
            raise ValueError(
                f"`input_values` must be a [batch, frames, mel_bins] fbank, got shape {tuple(input_values.shape)}"
            )
        batch_size, num_frames, num_bins = input_values.shape
        patch = self.config.input_patch_size
        if num_frames < patch or num_bins < patch:
            raise ValueError(
                f"`input_values` of shape {tuple(input_values.shape)} is smaller than one {patch}x{patch} patch"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, num_frames):
            raise ValueError(
                f"`attention_mask` must have shape {(batch_size, num_frames)} to match `input_values`, got "
                f"{tuple(attention_mask.shape)}"
            )

        features = self.patch_embedding(input_values.to(self.patch_embedding.weight.dtype).unsqueeze(1))
        features = features.reshape(batch_size, features.shape[1], -1).transpose(1, 2)
        features = self.layer_norm(features)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        hidden_states = self.dropout_input(features)

        key_padding_mask = None
        if attention_mask is not None:
            patch_mask = self._frame_patch_mask(attention_mask, num_bins // patch)
            key_padding_mask = patch_mask == 0
            # Rows without a single real patch attend everywhere instead of producing NaN; they are padding anyway.
            key_padding_mask = key_padding_mask & ~key_padding_mask.all(-1, keepdim=True)
            if not key_padding_mask.any():
                key_padding_mask = None

        outputs = self.encoder(hidden_states, key_padding_mask, output_hidden_states=output_hidden_states)
        if not return_dict:
            return tuple(value for value in (outputs.last_hidden_state, outputs.hidden_states) if value is not None)
        return outputs


__all__ = ["BeatsPreTrainedModel", "BeatsModel"]
