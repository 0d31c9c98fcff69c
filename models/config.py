"""Model hyperparameters: one frozen, hashable dataclass usable as a static jit argument."""

from __future__ import annotations

import dataclasses

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 rope scaling: long wavelengths are stretched by ``factor``, short ones kept,
    the band between ``high_freq_factor`` and ``low_freq_factor`` interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. ``attention_bias`` is the Qwen2 bias on q/k/v (not o);
    ``sliding_window`` (Mistral) lets a token see the last ``sliding_window`` positions."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be None or positive, got {self.sliding_window}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: "
                             f"{', '.join(ARCHITECTURES)}")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """From a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        architectures = hf.get("architectures") or [hf.get("model_type", "<none>")]
        arch = architectures[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu'")
        for flag in ("mlp_bias", "attention_bias"):
            # Llama's attention_bias also puts a bias on o_proj, which this model lacks.
            if arch == "LlamaForCausalLM" and hf.get(flag):
                raise ValueError(f"unsupported {flag}=true for {arch}")
        num_heads = hf["num_attention_heads"]
        theta, scaling = _rope(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM",
            sliding_window=_sliding_window(arch, hf),
            architecture=arch,
        )


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_scaling`` +
    ``rope_theta`` (transformers 4)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: 'default', 'llama3'")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                        hf.get("max_position_embeddings"))))


def _sliding_window(arch: str, hf: dict) -> int | None:
    window = hf.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return None
    layer_types = hf.get("layer_types")
    if arch == "Qwen2ForCausalLM":
        if not hf.get("use_sliding_window", False):
            return None
        if layer_types is None:  # transformers 4: layers from max_window_layers on slide
            first = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
    kinds = set(layer_types or ["sliding_attention"])
    if kinds == {"full_attention"}:
        return None
    if kinds != {"sliding_attention"}:
        raise ValueError(f"per-layer sliding window (layer_types {sorted(kinds)}) is not "
                         f"supported")
    return int(window)


def tiny_config(**overrides) -> ModelConfig:
    """The embedded default model (random weights): small enough to run fast on a CPU."""
    defaults = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
                    architecture="LlamaForCausalLM")
    return ModelConfig(**{**defaults, **overrides})
