"""
Converts an original BEATs checkpoint (Microsoft / SALMONN `.pt` with `cfg` and `model`) into a transformers folder
that loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

    salmonn-convert-beats --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --output beats-hf

The folder is written next to `--output` under a temporary name, reloaded in a fresh Python process and run once,
and only then moved into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser

from salmonn.conversion.beats import load_original_beats
from salmonn.cli import setup_logging
from salmonn.conversion.io_utils import atomic_output_dir, check_output_dir, check_output_not_input
from modeling_salmonn.modeling_beats import BEATS_NUM_MEL_BINS, BeatsModel


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_MAP = {"AutoConfig": "configuration_salmonn.BeatsConfig", "AutoModel": "modeling_beats.BeatsModel"}
# The remote code of a BEATs folder: flat files that only import each other (see modeling_salmonn/).
REMOTE_CODE_FILES = ("configuration_salmonn.py", "modeling_beats.py")
# Frames of the fbank used for the check run: two rows, the second padded, so that masking is exercised too.
_CHECK_FRAMES = (96, 70)
_CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class ConvertBeatsArguments:
    beats: str = field(
        metadata={"help": "Original BEATs checkpoint (.pt holding `cfg` and `model`), e.g. the SALMONN `beats_path`."}
    )
    output: str = field(metadata={"help": "Folder to write (config.json, model.safetensors and the remote code)."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace `--output` if empty or an earlier output (it holds config.json); never another folder."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the saved weights.", "choices": sorted(DTYPES)},
    )


def _check_inputs(num_mel_bins: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    frames = max(_CHECK_FRAMES)
    input_values = torch.randn(len(_CHECK_FRAMES), frames, num_mel_bins, generator=generator)
    attention_mask = torch.zeros(len(_CHECK_FRAMES), frames, dtype=torch.long)
    for row, length in enumerate(_CHECK_FRAMES):
        attention_mask[row, :length] = 1
    return {"input_values": input_values, "attention_mask": attention_mask}


_VERIFY_SCRIPT = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

folder, inputs_file, outputs_file = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
model.eval()
inputs = load_file(inputs_file)
with torch.no_grad():
    output = model(inputs["input_values"], attention_mask=inputs["attention_mask"]).last_hidden_state
save_file({"last_hidden_state": output.float().contiguous()}, outputs_file)
print(type(model).__module__, type(model).__name__, str(next(model.parameters()).dtype))
"""


def verify_folder(folder: Path, model: BeatsModel) -> None:
    """Loads `folder` with AutoModel and remote code in a fresh offline process and compares one run with `model`."""
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="salmonn-beats-verify-") as work:
        work = Path(work)
        inputs = _check_inputs(BEATS_NUM_MEL_BINS)
        save_file(inputs, str(work / "inputs.safetensors"))
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_MODULES_CACHE")}
        env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home")})
        command = [
            sys.executable,
            "-c",
            textwrap.dedent(_VERIFY_SCRIPT),
            str(folder),
            str(work / "inputs.safetensors"),
            str(work / "outputs.safetensors"),
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(work),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"the converted folder {folder} failed to load or run with AutoModel.from_pretrained("
                f"trust_remote_code=True) in a fresh process:\n{result.stderr[-4000:]}"
            )
        loaded_class = result.stdout.strip().splitlines()[-1]
        if "BeatsModel" not in loaded_class or str(dtype) not in loaded_class:
            raise RuntimeError(
                f"the converted folder {folder} loaded as {loaded_class!r}, expected BeatsModel in {dtype}"
            )
        reloaded = load_file(str(work / "outputs.safetensors"))["last_hidden_state"]

    model.eval()
    with torch.no_grad():
        expected = model(inputs["input_values"], attention_mask=inputs["attention_mask"]).last_hidden_state.float()
    patch_mask = model.get_patch_attention_mask(inputs["attention_mask"]).bool()
    difference = (reloaded - expected)[patch_mask].abs().max().item()
    if not difference <= _CHECK_TOLERANCE[dtype]:
        raise RuntimeError(
            f"the converted folder {folder} reloads with different outputs (max abs difference {difference:.3g})"
        )
    logger.info("Verified %s in a fresh process: max abs difference %.3g", folder, difference)


def convert_beats(
    beats: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False, dtype: str = "float32"
) -> Path:
    """Converts, verifies and moves the folder into place; returns the output folder."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    output = Path(output)
    check_output_not_input(output, {"--beats": beats})
    # Checked again when the folder is moved into place; failing here avoids reading a large checkpoint first.
    check_output_dir(output, overwrite)
    config, state_dict = load_original_beats(beats)
    config.auto_map = dict(AUTO_MAP)

    model = BeatsModel(config)
    model.load_state_dict(state_dict, strict=True)
    model.to(DTYPES[dtype])
    model.eval()

    code_dir = Path(sys.modules[BeatsModel.__module__].__file__).parent
    with atomic_output_dir(output, overwrite=overwrite) as tmp_dir:
        model.save_pretrained(tmp_dir)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(code_dir / name, tmp_dir / name)
        saved_config = json.loads((tmp_dir / "config.json").read_text())
        if saved_config.get("auto_map") != AUTO_MAP:
            raise RuntimeError(f"config.json in {output} lacks the expected auto_map {AUTO_MAP}")
        verify_folder(tmp_dir, model)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(
        ConvertBeatsArguments,
        allow_abbrev=False,
        description="Convert an original BEATs checkpoint into a folder that AutoModel loads with trust_remote_code.",
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    setup_logging()
    try:
        output = convert_beats(args.beats, args.output, overwrite=args.overwrite, dtype=args.dtype)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"salmonn-convert-beats: error: {error}", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
