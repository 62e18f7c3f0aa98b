"""Stage 3: export a merged HF folder to an ONNX Runtime GenAI folder and check it computes what torch computes.

Two exporters, one output layout (model.onnx [+ external data], genai_config.json, tokenizer files, chat template):

  genai    onnxruntime-genai's model builder (the default): fused contrib ops (GroupQueryAttention, rotary
           embedding, SkipSimplifiedLayerNormalization), a KV cache updated in place, genai_config.json written
           by the builder. Runs in-process, reads only the local folder (no hub, no token).
  optimum  optimum-onnx's torch.onnx export, task text-generation-with-past: standard ONNX ops, any architecture
           transformers can trace. genai_config.json is written here from the model's own input/output names.

The builder makes the LM head from the first nn.Linear it meets whose out_features equals vocab_size, and meets
the decoder layers' projections first: where one of them (or a half it unpacks from a packed gate_up or qkv) is
vocab_size wide, its LM head reads layer 0's hidden state. `builder_lm_head_clash` finds those models from
the config alone, and `export(exporter="genai")` exports them with optimum instead, saying why in
export_report.json (docs/phi3-builder-avx2.md: found as an "AVX2-only" parity failure; it fails on every CPU).
The same fallback takes configs whose head_size or rotary width ONNX Runtime's CPU GroupQueryAttention refuses
(`builder_cpu_attention_reason`; no Phi card).

Parity runs the exported model the way a device does, through onnxruntime-genai: for each prompt (chat template
applied, tokenized by onnxruntime-genai) a prefill of the whole prompt, then DECODE_STEPS greedy single-token steps
through the KV cache. torch (fp32) then scores the same sequence in one forward pass, and every position's logits
are compared: max |diff| above TOLERANCE[precision] fails the stage and writes nothing. onnxruntime-genai's tokenizer
must also give the HF tokenizer's ids, on the prompts and on a few awkward strings.

Only fp32 here: int4/int8 weights are the quantize stage's job (it reads this folder).
"""
from __future__ import annotations

import contextlib
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir
from toolchain.hf.models import load_causal_lm, load_tokenizer, user_prompt
from toolchain.stages.merge import PROMPTS
from toolchain.stages.package import versions

EXPORTERS = ("genai", "optimum")
# Measured max |logit diff|, fp32 ONNX (through onnxruntime-genai) vs torch: 2.4e-7 on the random 2-layer Phi-3 of
# the tests (logits up to 0.7), 1.4e-4 (genai) and 1.2e-4 (optimum) on SmolLM2-135M (logits up to 39). 1e-3 leaves
# ~7x room for deeper and wider models while a wrong weight, mask or rotary layout shows up as 1e-1 or more.
TOLERANCE = {"fp32": 1e-3}
DECODE_STEPS = 4
TOKENIZER_CHECKS = ["Hello world", "  two  spaces, digits 12345 and\nnew lines\n\n", "naïve café — ünïcödé ✓"]
# ONNX Runtime's CPU GroupQueryAttention, the attention of every builder graph, refuses at run time a head_size that
# is not a multiple of 16 ("head_size shall be a multiple of 16") and a rotary cache whose width, rotary dims / 2,
# is not a multiple of 8 ("cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"); measured on
# onnxruntime 1.32 with tiny Phi-3s (head 24; head 32 at partial rotary 0.75). Every Phi card passes: head 96 or 128,
# rotary width 48 or 64 (Phi-4-mini: 128 x 0.75 / 2 = 48). Optimum's graph uses standard ops, with no such limits.
GQA_HEAD_MULTIPLE = 16
GQA_ROTARY_WIDTH_MULTIPLE = 8
# onnxruntime-genai 0.15 decoder-only model types (the "type" in genai_config.json).
GENAI_TYPES = {"chatglm", "ernie4_5", "gemma", "gemma2", "granite", "internlm2", "llama", "mistral", "nemotron",
               "olmo", "phi", "phi3", "qwen2", "qwen3", "smollm3"}


def check_source(model_dir: Path) -> dict:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise ToolchainError(f"{model_dir}: not an HF model folder (no config.json); pass the folder `toolchain merge` wrote")
    if not any(model_dir.glob("*.safetensors")):
        raise ToolchainError(f"{model_dir}: no *.safetensors weights; export reads safetensors only "
                             "(re-save the model with save_pretrained(..., safe_serialization=True))")
    cfg = json.loads(cfg_file.read_text())
    if not cfg.get("architectures"):
        raise ToolchainError(f"{cfg_file}: no 'architectures' (e.g. [\"Phi3ForCausalLM\"]); the exporters pick the "
                             "model class from it. Add it, as the published config.json has it")
    if cfg.get("quantization_config"):
        raise ToolchainError(f"{cfg_file}: the model is quantized ({cfg['quantization_config'].get('quant_method')}); "
                             "export the full-precision merged folder, then run the quantize stage on the ONNX model")
    return cfg


def builder_lm_head_clash(model_dir: Path, trust_remote_code: bool = False) -> list[str]:
    """The modules onnxruntime-genai's builder would take for the LM head instead of the model's own; [] if none.

    The builder (0.15.2, builders/base.py `has_lm_head`) walks model.modules() and makes /lm_head/MatMul from the
    first nn.Linear whose out_features == config.vocab_size, fed from the last layer norm it has made; the real
    head's MatMul is then dropped (nodes are deduplicated by name), only its weight is kept. The walk reaches each
    decoder layer's projections before the real head, including those the builder attaches while unpacking:
    gate_proj/up_proj (intermediate_size) from a packed gate_up_proj, q/k/v_proj (heads x head_dim, kv_heads x
    head_dim) from a packed qkv_proj. A random 2-layer Phi-3 with 512 ids clashes at intermediate 256 (gate_up_proj,
    512 wide) and 512 (its halves). Found from the config on the meta device: no weights are read."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        return []
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    unpacked = {"gate_up_proj": ("gate/up halves", {getattr(cfg, "intermediate_size", 0)}),
                "dense_h_to_4h": ("gate/up halves", {getattr(cfg, "intermediate_size", 0)}),
                "qkv_proj": ("q/k/v", {heads * head_dim, kv_heads * head_dim}),
                "query_key_value": ("q/k/v", {heads * head_dim, kv_heads * head_dim})}
    found = []
    for name, m in model.named_modules():
        if m is head or not isinstance(m, torch.nn.Linear):
            continue
        if m.out_features == vocab:
            found.append(f"{name} (out_features {vocab})")
        what, widths = unpacked.get(name.rsplit(".", 1)[-1], ("", set()))
        if vocab in widths:
            found.append(f"the {what} the builder unpacks from {name} ({vocab} wide)")
    return found


def builder_clash_reason(model_dir: Path, trust_remote_code: bool = False) -> Optional[str]:
    """One sentence for the user when the builder would make a wrong LM head for this model, else None."""
    clash = builder_lm_head_clash(model_dir, trust_remote_code)
    if not clash:
        return None
    import onnxruntime_genai as og

    more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
    return (f"the onnxruntime-genai {og.__version__} model builder would make the LM head from {clash[0]}{more}: it "
            f"takes the first Linear as wide as the vocabulary for the head, so its logits would be wrong")


def builder_cpu_attention_reason(cfg: dict) -> Optional[str]:
    """One sentence when ONNX Runtime's CPU GroupQueryAttention cannot run the builder's graph of this config.json
    (head_size or rotary width off the kernel's multiples), else None."""
    heads = cfg.get("num_attention_heads") or 0
    head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else 0)
    if not head:
        return None
    width = int(head * (cfg.get("partial_rotary_factor") or 1.0)) // 2
    if head % GQA_HEAD_MULTIPLE == 0 and width % GQA_ROTARY_WIDTH_MULTIPLE == 0:
        return None
    import onnxruntime

    return (f"onnxruntime {onnxruntime.__version__}'s CPU GroupQueryAttention, which the onnxruntime-genai builder's "
            f"graph uses, needs head_size a multiple of {GQA_HEAD_MULTIPLE} and a rotary width (rotary dims / 2) a "
            f"multiple of {GQA_ROTARY_WIDTH_MULTIPLE}; this model has head_size {head}, rotary width {width}")


@contextlib.contextmanager
def _quiet(log: Path):
    """Send a tool's prints and progress bars to a log file; on error, their tail goes into the message."""
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _tail(log: Path, n: int = 15) -> str:
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines() if log.is_file() else []
    return "\n".join([x for x in lines if x.strip()][-n:])


def export_genai(model_dir: Path, out: Path, precision: str, work: Path, trust_remote_code: bool,
                  execution_provider: str = "cpu", options: tuple[str, ...] = ()) -> None:
    """onnxruntime-genai's model builder, for an execution provider (cpu, cuda, dml, webgpu). hf_token=false: no
    credentials are read; the input is a local folder, so transformers never looks at the hub (cache_dir stays empty)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    opts = ["hf_token=false", f"hf_remote={str(trust_remote_code).lower()}", *options]
    log, cache = work / "builder.log", str(work / "cache")
    try:
        with _quiet(log):
            extra = parse_extra_options(None, str(model_dir), str(out), precision, execution_provider, cache, opts)
            create_model(None, str(model_dir), str(out), precision, execution_provider, cache, **extra)
    except NotImplementedError:
        arch = (json.loads((model_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
        hint = "; try the optimum exporter" if arch.endswith("ForCausalLM") else " (export takes decoder-only LMs)"
        raise ToolchainError(f"{model_dir}: the onnxruntime-genai model builder does not support {arch}{hint}") from None
    except Exception as e:
        raise ToolchainError(f"the onnxruntime-genai model builder failed on {model_dir}: {type(e).__name__}: {e}\n"
                             f"{_tail(log)}") from e


def _genai_config(cfg: dict, gen: dict, onnx_file: Path) -> dict:
    """genai_config.json for a plain decoder exported by optimum, from the ONNX model's own inputs and outputs."""
    import onnx

    m = onnx.load(str(onnx_file), load_external_data=False)
    inputs, outputs = {i.name: i for i in m.graph.input}, {o.name for o in m.graph.output}
    n_layers = cfg["num_hidden_layers"]
    need_in = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    need_out = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    missing = [x for x in need_in if x not in inputs] + [x for x in need_out if x not in outputs]
    if missing:
        raise ToolchainError(f"{onnx_file}: the exported model lacks {', '.join(missing[:4])}; onnxruntime-genai needs "
                             "input_ids, attention_mask, past_key_values.N.key/value, logits and present.N.key/value")
    kv_shape = [d.dim_value for d in inputs["past_key_values.0.key"].type.tensor_type.shape.dim]  # [b, kv_heads, past, head]
    kv_heads = kv_shape[1] or cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_size = kv_shape[3] or cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    model_type = cfg.get("model_type", "")
    if model_type not in GENAI_TYPES:
        raise ToolchainError(f"model_type '{model_type}' is not a decoder type onnxruntime-genai knows "
                             f"({', '.join(sorted(GENAI_TYPES))})")

    def pick(key, default=None):
        v = gen.get(key)
        return v if v is not None else cfg.get(key, default)

    eos = pick("eos_token_id")
    pad = pick("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    ctx = cfg.get("max_position_embeddings", 2048)
    dec_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        dec_inputs["position_ids"] = "position_ids"
    dec_inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    return {
        "model": {
            "bos_token_id": pick("bos_token_id", 1),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_file.name,
                "head_size": head_size,
                "hidden_size": cfg["hidden_size"],
                "inputs": dec_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg["num_attention_heads"],
                "num_hidden_layers": n_layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", False)), "early_stopping": True,
            "length_penalty": 1.0, "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            # optimum's present.N = concat(past.N, new): the cache grows each step instead of being updated in place
            "past_present_share_buffer": False,
            "repetition_penalty": gen.get("repetition_penalty", 1.0), "temperature": gen.get("temperature", 1.0),
            "top_k": gen.get("top_k", 50), "top_p": gen.get("top_p", 1.0),
        },
    }


def _export_optimum(model_dir: Path, out: Path, precision: str, work: Path, trust_remote_code: bool, cfg: dict) -> None:
    import warnings

    from optimum.exporters.onnx import main_export

    log = work / "optimum.log"
    try:
        with _quiet(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from tracing the cache code
            main_export(str(model_dir), output=out, task="text-generation-with-past", device="cpu", dtype=precision,
                        do_validation=False, local_files_only=True, trust_remote_code=trust_remote_code,
                        library_name="transformers")
    except Exception as e:
        raise ToolchainError(f"optimum's ONNX export failed on {model_dir}: {type(e).__name__}: {e}\n{_tail(log)}") from e
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    genai = _genai_config(cfg, gen, out / "model.onnx")
    (out / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")
    # tokenizer files as the builder writes them: re-saved with a finite model_max_length (not HF's 1e30 default)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tok.model_max_length = genai["model"]["context_length"]
    tok.save_pretrained(out)


def _genai_run(og_model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy decoding through onnxruntime-genai: one prefill of the prompt, then DECODE_STEPS single-token steps
    through the KV cache. Returns the sequence and the logits at every position of it."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + DECODE_STEPS + 1)
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    rows = [np.asarray(gen.get_output("logits"), dtype=np.float32)[0]]  # [prompt, vocab]
    seq = list(prompt)
    for _ in range(DECODE_STEPS):
        seq.append(int(rows[-1][-1].argmax()))
        gen.append_tokens(np.asarray(seq[-1:], dtype=np.int32))
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32)[0])  # [1, vocab]
    return seq, np.concatenate(rows)


@torch.no_grad()
def _torch_logits(model_dir: Path, seqs: list[list[int]], trust_remote_code: bool) -> list[np.ndarray]:
    model = load_causal_lm(model_dir, trust_remote_code)
    out = [model(torch.tensor([s])).logits[0].float().numpy() for s in seqs]
    del model
    gc.collect()
    return out


def check_parity(onnx_dir: Path, model_dir: Path, precision: str = "fp32", trust_remote_code: bool = False) -> dict:
    """Tokenizer ids and logits of the onnxruntime-genai folder against the HF folder (torch, fp32)."""
    import onnxruntime_genai as og

    tok = load_tokenizer(model_dir, trust_remote_code)
    texts = [user_prompt(tok, p) for p in PROMPTS]
    try:
        og_model = og.Model(str(onnx_dir))
    except Exception as e:  # a genai_config.json that does not match the ONNX model
        raise ToolchainError(f"{onnx_dir}: onnxruntime-genai cannot load the exported folder: {e}") from e
    og_tok = og.Tokenizer(og_model)
    for text in TOKENIZER_CHECKS + texts:
        want, got = tok(text)["input_ids"], [int(x) for x in og_tok.encode(text)]
        if want != got:
            raise ToolchainError(f"{onnx_dir}: onnxruntime-genai's tokenizer gives other ids than the HF tokenizer for "
                                 f"{text[:60]!r} (HF {want[:12]}..., genai {got[:12]}...); fix tokenizer.json in {model_dir}")
    # what a device runs: onnxruntime-genai's ids for the templated prompt (equal to HF's, checked above)
    try:
        runs = [_genai_run(og_model, [int(x) for x in og_tok.encode(t)]) for t in texts]
    except RuntimeError as e:  # a kernel refusing the graph's shapes
        raise ToolchainError(f"{onnx_dir}: onnxruntime-genai cannot run the exported model: {e}") from e
    del og_model, og_tok  # torch and onnxruntime never hold the weights at the same time
    gc.collect()
    refs = _torch_logits(model_dir, [seq for seq, _ in runs], trust_remote_code)
    diff = max(float(np.abs(got - want).max()) for (_, got), want in zip(runs, refs))
    agree = sum(int((got.argmax(-1) == want.argmax(-1)).sum()) for (_, got), want in zip(runs, refs))
    n = sum(len(want) for want in refs)
    tol = TOLERANCE[precision]
    return {"max_abs_logit_diff": diff, "max_abs_logit": max(float(np.abs(w).max()) for w in refs),
            "top1_agreement": agree / n, "positions": n, "prompts": len(PROMPTS), "decode_steps": DECODE_STEPS,
            "tolerance": tol, "passed": diff <= tol, "tokenizer_ids_match": True}


def export(model_dir: Path, out: Path, exporter: str = "genai", precision: str = "fp32",
           trust_remote_code: bool = False) -> dict:
    """Export `model_dir` (an HF folder, e.g. from `toolchain merge`) into `out`, an onnxruntime-genai folder with
    export_report.json; raise ToolchainError, writing nothing, if the ONNX model does not match torch. "genai" on a
    model the builder would give a wrong LM head (builder_lm_head_clash), or whose attention shapes ONNX Runtime's
    CPU kernel refuses (builder_cpu_attention_reason), exports with optimum: the report's exporter says which ran,
    requested_exporter and fallback_reason why."""
    model_dir, out = Path(model_dir), Path(out)
    if exporter not in EXPORTERS:
        raise ToolchainError(f"unknown exporter '{exporter}'; choose one of: {', '.join(EXPORTERS)}")
    if precision not in TOLERANCE:
        raise ToolchainError(f"export precision '{precision}' is not supported; export fp32, then run the quantize "
                             "stage for int4/int8")
    cfg = check_source(model_dir)
    requested, fallback = exporter, None
    if exporter == "genai":
        fallback = builder_cpu_attention_reason(cfg) or builder_clash_reason(model_dir, trust_remote_code)
        if fallback:
            exporter = "optimum"
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="toolchain-export-") as work:
        if exporter == "genai":
            export_genai(model_dir, tmp, precision, Path(work), trust_remote_code)
        else:
            _export_optimum(model_dir, tmp, precision, Path(work), trust_remote_code, cfg)
        export_s = time.perf_counter() - t0
        parity = check_parity(tmp, model_dir, precision, trust_remote_code)
        if not parity["passed"]:
            raise ToolchainError(
                f"export parity failed: max |logit diff| {parity['max_abs_logit_diff']:.2e} > {parity['tolerance']:.0e} "
                f"between torch and the {exporter} ONNX model (top-1 agreement {parity['top1_agreement']:.3f}); "
                f"nothing written to {out}")
        report = {
            "exporter": exporter, "precision": precision, "source": str(model_dir),
            "model_type": cfg.get("model_type"), "parity": parity,
            **({"requested_exporter": requested, "fallback_reason": f"{fallback}; exported with optimum"}
               if fallback else {}),
            "export_s": round(export_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
            "versions": versions(),
        }
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
