"""One rank of a DeepSpeed fine-tune, as torch.distributed.run starts it (see distributed.py): rebuild the resolved
model and recipe that launch() wrote, and run the same fine-tune as a single process would."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from toolchain.config.schema import Launch, ModelCard, Recipe
from toolchain.config.sources import Resolved
from toolchain.runtime.errors import ToolchainError
from toolchain.stages.finetune.decoder import finetune


def main() -> None:
    a = json.loads(Path(sys.argv[1]).read_text())
    src = Resolved(ModelCard.model_validate(a["card"]), Path(a["path"]), a["trust_remote_code"])
    try:
        finetune(src, Recipe.model_validate(a["recipe"]), Path(a["recipe_file"]), Path(a["out"]),
                 evaluate=a["evaluate"], launch=Launch.model_validate(a["launch"]))
    except ToolchainError as e:
        print(f"error (rank {os.environ.get('RANK')}): {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
