"""Seeing what a recaptioning job wrote (recaption.py --preview N): a contact sheet of its first N samples (the
image, the original caption and the dense one, with their word counts, or why a sample got none) and a histogram
of the generated captions' word counts with the job's floor and ceiling marked. Both are read from the done
shards, so a preview works while a job is still running."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageDraw

from llm4gen.datamodules.shards import LockstepShard, iter_tar_samples
from llm4gen.datamodules.transforms import SampleError, decode_image, find_image_member
from llm4gen.evaluation.grids import BACKGROUND, FAINT, INK, font, wrap
from llm4gen.tools.recaption_shards import companion_paths, finished_record, input_urls, job_fingerprint, read_job
from llm4gen.tools.recaption_model import RecaptionError

SHEET_FILE, HISTOGRAM_FILE = "preview.png", "word_counts.png"
DENSE_INK, SKIP_INK = (20, 90, 40), (170, 40, 30)


def done_shards(output: str) -> tuple[dict[str, Any], list[tuple[LockstepShard, dict[str, Any]]]]:
    """The job's settings and its done shards, each as the lockstep shard training reads, with its record."""
    document = read_job(output)
    urls = input_urls(document["inputs"])
    paths = companion_paths(urls, output)
    fingerprint = job_fingerprint(document)
    done = []
    for url in urls:
        record = finished_record(paths[url], fingerprint)
        if record is not None:
            done.append((LockstepShard(str(url), [*getattr(url, "companions", ()), paths[url]]), record))
    if not done:
        raise RecaptionError(f"{output}: no shard is done yet, so there is nothing to preview; run the job first")
    return document, done


def words(text: Optional[str]) -> int:
    return len(text.split()) if text else 0


def fit(image: Image.Image, side: int) -> Image.Image:
    """The image scaled to fit a ``side`` square, keeping its aspect: shrunk smoothly, or enlarged with
    nearest-neighbour so a tiny image keeps its pixels."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)


def sample_cell(raw: dict[str, Any], document: dict[str, Any], side: int = 160, width: int = 620,
                font_size: int = 12) -> Image.Image:
    """One sample: its image on the left; its key, original caption and dense caption (or the reason it has
    none) on the right, each with its word count."""
    text_font, line = font(font_size), font_size + 4
    chars = max(20, int((width - side - 16) / (font_size * 0.55)))
    record = json.loads(raw.get(document["record_key"], b"{}"))
    dense = raw.get(document["caption_key"])
    blocks: list[tuple[str, tuple[int, int, int], int]] = [(f"{raw['__key__']}", FAINT, 1)]
    original = record.get("original_caption")
    blocks.append((f"original ({words(original)} words): {original or '(none)'}", INK, 4))
    if dense is not None:
        text = dense.decode("utf-8")
        blocks.append((f"dense ({words(text)} words): {text}", DENSE_INK, 12))
    else:
        said = record.get("text")
        detail = f" ({record['words']} words): {said}" if said is not None else ""
        blocks.append((f"no dense caption: {record.get('status', 'no record')}{detail}", SKIP_INK, 8))
    lines = [(text, ink) for block, ink, most in blocks for text in wrap(block, chars, most)]
    cell = Image.new("RGB", (width, max(side, len(lines) * line) + 10), BACKGROUND)
    try:
        image = fit(decode_image(find_image_member(raw)), side)
        cell.paste(image, (4 + (side - image.width) // 2, 4 + (side - image.height) // 2))
    except SampleError as error:
        ImageDraw.Draw(cell).text((8, side // 2), error.reason, fill=SKIP_INK, font=text_font)
    draw = ImageDraw.Draw(cell)
    for k, (text, ink) in enumerate(lines):
        draw.text((side + 12, 4 + k * line), text, fill=ink, font=text_font)
    return cell


def contact_sheet(output: str, count: int, columns: int = 2) -> Image.Image:
    """The first ``count`` samples of the job's done shards, in shard order, ``columns`` cells a row."""
    document, done = done_shards(output)
    cells = []
    for shard, _ in done:
        try:
            for raw in iter_tar_samples(shard):
                cells.append(sample_cell(raw, document))
                if len(cells) == count:
                    break
        except SampleError:
            pass  # a broken input shard: its readable samples are shown
        if len(cells) == count:
            break
    title_font = font(14)
    title = (f"{document['model']}, key {document['caption_key']}, {document['prompt_format']} prompt: "
             f"{document['prompt']}")
    heading = wrap(title, 150, 3)
    top = 8 + 18 * len(heading)
    cell_w, cell_h = max(c.width for c in cells), max(c.height for c in cells)
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * (cell_w + 8) + 8, top + rows * (cell_h + 8)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(heading):
        draw.text((8, 6 + 18 * k), text, fill=INK, font=title_font)
    for i, cell in enumerate(cells):
        x, y = 8 + (i % columns) * (cell_w + 8), top + (i // columns) * (cell_h + 8)
        sheet.paste(cell, (x, y))
        draw.rectangle((x - 1, y - 1, x + cell_w, y + cell_h), outline=FAINT)
    return sheet


def word_histogram(counts: Counter, floor: int, ceiling: int, width: int = 720, height: int = 360) -> Image.Image:
    """Bars of the generated captions' word counts (word count -> captions), the kept range [floor, ceiling]
    marked; bars outside it are the captions refused as too short or too long."""
    text_font = font(12)
    left, right, top, bottom = 56, 16, 40, 44
    largest = max([*counts, ceiling + 10, 1])
    span = max(1, -(-(largest + 1) // 48))  # word counts per bar: at most ~48 bars
    bins: Counter = Counter()
    for count, n in counts.items():
        bins[count // span] += n
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom
    bars = largest // span + 1
    tallest = max(bins.values(), default=1)
    for b, n in bins.items():
        x0 = left + b * plot_w / bars
        kept = floor <= b * span and (b + 1) * span - 1 <= ceiling
        draw.rectangle((x0 + 1, top + plot_h * (1 - n / tallest), x0 + plot_w / bars - 1, top + plot_h),
                       fill=DENSE_INK if kept else SKIP_INK)
    for limit, label in ((floor, f"--min-words {floor}"), (ceiling, f"--max-words {ceiling}")):
        x = left + (limit / span) * plot_w / bars
        draw.line((x, top - 4, x, top + plot_h), fill=INK, width=1)
        draw.text((x + 3, top - 14), label, fill=INK, font=text_font)
    draw.line((left, top + plot_h, left + plot_w, top + plot_h), fill=INK)
    for k in range(0, 6):
        value = round(k * largest / 5)
        x = left + (value / span) * plot_w / bars
        draw.text((x - 6, top + plot_h + 4), str(value), fill=INK, font=text_font)
    draw.text((left, height - 18), f"words per generated caption ({span} per bar)", fill=INK, font=text_font)
    draw.text((4, top - 4), str(tallest), fill=INK, font=text_font)
    draw.text((4, top + plot_h - 12), "0", fill=INK, font=text_font)
    total = sum(counts.values())
    kept = sum(n for c, n in counts.items() if floor <= c <= ceiling)
    draw.text((left, 6), f"{total} generated captions: {kept} kept, {total - kept} outside [{floor}, {ceiling}]",
              fill=INK, font=font(14))
    return image


def write_preview(output: str, count: int, columns: int = 2) -> tuple[Path, Path]:
    """Writes ``preview.png`` (the contact sheet) and ``word_counts.png`` (the histogram) into the job's folder."""
    if count < 1:
        raise RecaptionError(f"--preview {count}: expected a positive number of samples to show")
    document, done = done_shards(output)
    counts: Counter = Counter()
    for _, record in done:
        counts.update({int(k): n for k, n in record["word_counts"].items()})
    sheet_path, histogram_path = Path(output) / SHEET_FILE, Path(output) / HISTOGRAM_FILE
    contact_sheet(output, count, columns).save(sheet_path)
    word_histogram(counts, document["min_words"], document["max_words"]).save(histogram_path)
    return sheet_path, histogram_path
