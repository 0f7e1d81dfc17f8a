"""Write ``examples/prompts.parquet``, the prompt file of the README's ``maskray generate`` command.

Run ``python examples/make_prompts.py`` after editing ``PROMPTS``. Columns follow ``pipeline.prompts``:
``prompt_id`` (unique, names the image files) and ``prompt``; ``seed``, ``negative_prompt`` and
``num_images`` are optional and left to the run's defaults here.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [  # captions in the shapes grammar (shapes/scenes.py), which shapes-meissonic was trained on
    "a red circle above a blue square",
    "a green triangle on a white background",
    "a large yellow diamond in the center",
    "two purple circles",
    "a small orange cross on the left",
    "a cyan square to the right of a pink triangle",
    "three blue squares on a black background",
    "a picture of a red diamond and a green circle",
    "an image of a large pink circle at the top",
    "a yellow triangle below a purple cross",
    "there is a blue circle, a red square and a yellow triangle",
    "a small green square at the bottom on a beige background",
]


def main() -> None:
    table = pa.table({"prompt_id": [f"example-{i:03d}" for i in range(len(PROMPTS))], "prompt": PROMPTS})
    path = Path(__file__).with_name("prompts.parquet")
    pq.write_table(table, path)
    print(f"wrote {table.num_rows} prompts to {path}")


if __name__ == "__main__":
    main()
