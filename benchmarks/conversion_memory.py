"""
Peak memory of salmonn-convert against the size of the LLM's shards.

Builds a synthetic release whose LLM is split into several `.bin` shards (at least 2 GB in all; the SALMONN `.pth`,
Whisper and BEATs come from fixture A in tests/fixtures, since the LLM's width must match the `.pth`), converts it in a
child process and prints that process's peak resident memory divided by the largest input shard. Target: at most
2x the largest shard plus 1 GB, whatever the total size. The reload check is set to `structure` because a full
reload needs the whole model in RAM by definition; the conversion itself is what is measured.

    python benchmarks/conversion_memory.py [--total-gb 2.2] [--shard-mb 400]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


logger = logging.getLogger(__name__)
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_tiny_a"


def build_llm(folder: Path, total_bytes: float, shard_bytes: float) -> int:
    """A LLaMA with the fixture's width (64) and layers (2) whose MLP is wide enough to reach `total_bytes`."""
    from transformers import LlamaConfig

    config = json.loads((FIXTURE / "llm" / "config.json").read_text())
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    intermediate = int(total_bytes / (layers * 3 * hidden * 4))
    config["intermediate_size"] = intermediate
    folder.mkdir(parents=True)
    LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}).save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(FIXTURE / "llm" / name, folder / name)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", torch.randn(vocab, hidden, generator=generator)
        for i in range(layers):
            p = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{proj}.weight", torch.randn(hidden, hidden, generator=generator) / 8
            yield p + "mlp.gate_proj.weight", torch.randn(intermediate, hidden, generator=generator) / 8
            yield p + "mlp.up_proj.weight", torch.randn(intermediate, hidden, generator=generator) / 8
            yield p + "mlp.down_proj.weight", torch.randn(hidden, intermediate, generator=generator) / 1000
            yield p + "input_layernorm.weight", torch.ones(hidden)
            yield p + "post_attention_layernorm.weight", torch.ones(hidden)
        yield "model.norm.weight", torch.ones(hidden)
        yield "lm_head.weight", torch.randn(vocab, hidden, generator=generator)

    shards, current, size = [], {}, 0
    for key, tensor in tensors():
        nbytes = tensor.numel() * 4
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    weight_map, largest = {}, 0
    for n, shard in enumerate(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        largest = max(largest, (folder / name).stat().st_size)
        weight_map.update({k: name for k in shard})
        del shard
    shards.clear()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return largest


def imports_peak_bytes() -> int:
    """Peak RSS of a fresh process that only imports the converter (Python, torch, transformers, safetensors)."""
    runner = (
        "import salmonn.conversion.convert_salmonn; "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    result = subprocess.run(
        [sys.executable, "-c", runner], check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    return int(result.stdout.strip().splitlines()[-1]) * 1024


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-gb", type=float, default=2.2, help="Size of the synthetic LLM in GB (float32).")
    parser.add_argument("--shard-mb", type=float, default=400, help="Largest input shard in MB.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.time()
        largest = build_llm(tmp / "llm", args.total_gb * 1e9, args.shard_mb * 1e6)
        total = sum(p.stat().st_size for p in (tmp / "llm").glob("*.bin"))
        logger.info("Synthetic LLM: %.2f GB in %d shards, largest %.0f MB (built in %.0f s)",
                    total / 1e9, len(list((tmp / "llm").glob("*.bin"))), largest / 1e6, time.time() - start)
        # The child reports its own high-water mark (VmHWM starts afresh at exec; ru_maxrss of children would
        # include this parent's memory, inherited through fork).
        runner = (
            "import sys, salmonn.conversion.convert_salmonn as c; code = c.main(sys.argv[1:]); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); sys.exit(code)"
        )
        command = [
            sys.executable, "-c", runner,
            "--salmonn-checkpoint", str(FIXTURE / "salmonn.pth"), "--whisper", str(FIXTURE / "whisper"),
            "--beats", str(FIXTURE / "beats.pt"), "--llm", str(tmp / "llm"), "--output", str(tmp / "out"),
            "--qformer-num-attention-heads", "4", "--max-shard-size", f"{int(args.shard_mb)}MB", "--verify", "structure",
        ]
        start = time.time()
        result = subprocess.run(
            command, check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
        )
        seconds = time.time() - start
        peak = int(result.stdout.strip().splitlines()[-1]) * 1024  # VmHWM is in KiB
        out_total = sum(p.stat().st_size for p in (tmp / "out").glob("*.safetensors"))
    baseline = imports_peak_bytes()
    target = 2 * largest + 1e9
    print(f"LLM total                : {total / 1e9:.2f} GB (output {out_total / 1e9:.2f} GB), conversion {seconds:.0f} s")
    print(f"largest input shard      : {largest / 1e6:.0f} MB")
    print(f"peak RSS of the converter: {peak / 1e6:.0f} MB")
    print(f"peak / largest shard     : {peak / largest:.2f}x  (target: <= 2x + 1 GB = {target / 1e6:.0f} MB -> {'met' if peak <= target else 'MISSED'})")
    print(f"peak / total LLM size    : {peak / total:.2f}x")
    print(f"of which imports alone   : {baseline / 1e6:.0f} MB (Python, torch, transformers: a process that only imports the converter)")


if __name__ == "__main__":
    main()
