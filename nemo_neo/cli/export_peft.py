"""Export nemo_neo LoRA / MoSLoRA adapters (adapters.safetensors) in peft's format.

  nemo-neo-export-peft --adapters runs/x/adapters.safetensors --base <nemo_neo ckpt> --out <dir>
  (also: python tools/export_peft_adapters.py ...)

Writes <dir>/adapter_model.safetensors + adapter_config.json. Load them on the HF export of the
base checkpoint (nemo-neo-convert neo-to-hf):
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<hf dir>), <dir>)
Fused q/k/v and gate/up adapters become per-projection adapters with A copied (exact); MoSLoRA's
mixer is folded into B (exact for inference). See nemo_neo/export/peft_adapters.py.
"""

from __future__ import annotations

import argparse
import json

from nemo_neo.errors import exit_on_user_error
from nemo_neo.export.peft_adapters import export_peft_adapters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", required=True, help="adapters.safetensors written by a LoRA / LLM-Neo run")
    parser.add_argument("--base", required=True, help="the nemo_neo checkpoint the adapters were trained on")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--base-name", default=None, help="base_model_name_or_path to record (default: --base)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        result = export_peft_adapters(args.adapters, args.base, args.out, base_model_name_or_path=args.base_name,
                                      overwrite=args.overwrite)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
