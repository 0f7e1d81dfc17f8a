"""Write ``examples/prompts.parquet``, the prompt file of the README's ``maskray generate`` command.

Run ``python examples/make_prompts.py`` after editing ``PROMPTS``. Columns follow ``pipeline.prompts``:
``prompt_id`` (unique, names the image files) and ``prompt``; ``seed``, ``negative_prompt`` and
``num_images`` are optional and left to the run's defaults here.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "a red circle above a blue square",
    "a green triangle on a white background",
    "a photo of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "a bowl of ramen, studio lighting",
    "a cat wearing a tiny wizard hat",
    "an isometric pixel-art castle",
    "a foggy pine forest at sunrise",
    "a vintage poster of a hot air balloon",
    "a close-up of a dew-covered spider web",
    "a neon-lit street in the rain at night",
    "a minimalist line drawing of a fox",
]


def main() -> None:
    table = pa.table({"prompt_id": [f"example-{i:03d}" for i in range(len(PROMPTS))], "prompt": PROMPTS})
    path = Path(__file__).with_name("prompts.parquet")
    pq.write_table(table, path)
    print(f"wrote {table.num_rows} prompts to {path}")


if __name__ == "__main__":
    main()
