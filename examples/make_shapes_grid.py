"""Draw ``docs/shapes-grid.png``: shapes-meissonic's images of the example prompts, each prompt under its image.

    python examples/make_shapes_grid.py [--model shapes-meissonic] [--out docs/shapes-grid.png]

The prompts are those of ``examples/prompts.parquet`` (the README's main command), at the model's default
settings and seed 0 of each prompt, as ``maskray sample`` draws them.
"""

import argparse
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SCALE, COLUMNS, CAPTION_LINES, LINE_HEIGHT = 3, 4, 3, 12  # 64 px images drawn at 192 px


def main() -> None:
    import mgt

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-meissonic")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "shapes-grid.png"))
    args = parser.parse_args()
    prompts = pq.read_table(HERE / "prompts.parquet")["prompt"].to_pylist()
    images = mgt.load_pipeline(args.model, device="cpu").generate(prompts, [0] * len(prompts)).images
    side = images.shape[1] * SCALE
    cell_height = side + CAPTION_LINES * LINE_HEIGHT + 8
    rows = -(-len(prompts) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * (side + 8) + 8, rows * cell_height + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        x, y = 8 + (i % COLUMNS) * (side + 8), 8 + (i // COLUMNS) * cell_height
        grid.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), (x, y))
        for line, text in enumerate(textwrap.wrap(prompt, width=32)[:CAPTION_LINES]):
            draw.text((x, y + side + 2 + line * LINE_HEIGHT), text, fill="black")
    grid.save(args.out)
    print(f"wrote {args.out} ({len(prompts)} prompts)")


if __name__ == "__main__":
    main()
