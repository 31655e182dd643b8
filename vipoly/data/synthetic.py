"""Synthetic trilingual multimodal training data for all five tasks (demo, tests, benchmarks).

    python -m vipoly.data.synthetic --out data/synthetic --n 2000 --seed 0

Writes the layout of `pipelines.prepare` (OUT/<task>/part-*.parquet, manifest.json, an empty
quarantine.jsonl). Every sentence comes from this module's own templates and vocabulary, aligned
across Vietnamese, English and Chinese, so that meaning is known exactly:

  text_pair   sentence pairs about (who, does what, where, when); the gold score is the share of the
              four slots the two sentences have in common (0, .25, .5, .75, 1 — a paraphrase in
              another word order scores 1). One in five positives is in another language.
  instr       instructions with their target: find the sentence about…, answer who…, translate…
  ocr         an image of rendered text → the text (DejaVu Sans for Latin script with Vietnamese
              diacritics, a Noto CJK font for Chinese)
  vqa_single  a scene of coloured shapes on a 3×3 grid + a question whose answer follows from the
              scene (counts, colours, positions, presence) → the answer
  vqa_multi   2–4 turns about one scene; earlier questions and answers in the query text
Languages are vi/en/zh at 60/30/10 within every task (exact up to rounding); tasks share `--n`
equally. Images are small (about 112 px; text images 28–112 px high) PNGs so the tiny model stays fast. The output depends only on
`--seed` and `--n` (PNG encoding and the fonts' basic layout are deterministic).
"""
from __future__ import annotations

import argparse
import glob
import io
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vipoly.data.schema import make_row, rows_to_table
from vipoly.data.shards import ShardWriter, write_manifest, write_quarantine
from vipoly.data.validate import check_row
from vipoly.tasks import TASKS

LANG_SHARES = {"vi": 0.6, "en": 0.3, "zh": 0.1}
LANGS3 = ("vi", "en", "zh")

# ---------------------------------------------------------------- vocabulary (vi, en, zh), aligned
SUBJECTS = [
    ("cô giáo", "the teacher", "老师"), ("người nông dân", "the farmer", "农民"), ("bác sĩ", "the doctor", "医生"),
    ("cậu bé", "the boy", "小男孩"), ("cô gái", "the girl", "女孩"), ("ông lão", "the old man", "老爷爷"),
    ("người đầu bếp", "the cook", "厨师"), ("anh kỹ sư", "the engineer", "工程师"), ("chị y tá", "the nurse", "护士"),
    ("người thợ may", "the tailor", "裁缝"), ("bà ngoại", "grandmother", "外婆"), ("cậu sinh viên", "the student", "大学生"),
]
ACTIONS = [
    ("đọc sách", "reads a book", "看书"), ("nấu cơm", "cooks rice", "做饭"), ("trồng rau", "plants vegetables", "种菜"),
    ("chơi đàn", "plays music", "弹琴"), ("viết thư", "writes a letter", "写信"), ("vẽ tranh", "paints a picture", "画画"),
    ("uống trà", "drinks tea", "喝茶"), ("sửa xe đạp", "repairs a bicycle", "修自行车"),
    ("học tiếng Anh", "studies English", "学英语"), ("tưới hoa", "waters the flowers", "浇花"),
    ("bán trái cây", "sells fruit", "卖水果"), ("tập thể dục", "does exercises", "锻炼身体"),
]
PLACES = [
    ("trong vườn", "in the garden", "在花园里"), ("ở thư viện", "at the library", "在图书馆"),
    ("bên bờ sông", "by the river", "在河边"), ("ở chợ", "at the market", "在市场"), ("trong bếp", "in the kitchen", "在厨房"),
    ("ở công viên", "in the park", "在公园"), ("trên sân thượng", "on the rooftop", "在屋顶上"),
    ("ở trường học", "at the school", "在学校"), ("ở bệnh viện", "at the hospital", "在医院"),
    ("gần nhà ga", "near the station", "在车站附近"),
]
TIMES = [
    ("vào buổi sáng", "in the morning", "早上"), ("vào buổi trưa", "at noon", "中午"),
    ("vào buổi chiều", "in the afternoon", "下午"), ("vào buổi tối", "in the evening", "晚上"),
    ("vào cuối tuần", "at the weekend", "周末"), ("mỗi ngày", "every day", "每天"), ("vào chủ nhật", "on Sundays", "星期天"),
]
SLOTS = (SUBJECTS, ACTIONS, PLACES, TIMES)
LI = {"vi": 0, "en": 1, "zh": 2}

# Word orders that keep the meaning: a pair written with two of them is still a paraphrase (score 1).
SENTENCE_TEMPLATES = {
    "vi": ["{s} {a} {p} {t}.", "{t}, {s} {a} {p}.", "{p}, {s} {a} {t}."],
    "en": ["{s} {a} {p} {t}.", "{t}, {s} {a} {p}.", "{p}, {s} {a} {t}."],
    "zh": ["{s}{t}{p}{a}。", "{t}，{s}{p}{a}。", "{t}{s}{p}{a}。"],
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def sentence(slots: tuple[int, int, int, int], lang: str, template: int = 0) -> str:
    s, a, p, t = (vocab[i][LI[lang]] for vocab, i in zip(SLOTS, slots))
    if lang == "zh":  # the place phrase (在…) goes before the verb; no capitals
        return SENTENCE_TEMPLATES["zh"][template].format(s=s, a=a, p=p, t=t)
    return _cap(SENTENCE_TEMPLATES[lang][template].format(s=s, a=a, p=p, t=t))


def _random_slots(rng: random.Random) -> tuple[int, int, int, int]:
    return tuple(rng.randrange(len(v)) for v in SLOTS)  # type: ignore[return-value]


def _other(rng: random.Random, n: int, not_this: int) -> int:
    return (not_this + 1 + rng.randrange(n - 1)) % n


# ---------------------------------------------------------------- fonts
def latin_font_path() -> str:
    """DejaVu Sans from matplotlib's data folder: it has every Vietnamese precomposed letter."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


CJK_FONT_GLOBS = ("/usr/share/fonts/**/NotoSansCJK*-Regular.ttc", "/usr/share/fonts/**/NotoSansCJK*.ttc",
                  "/usr/share/fonts/**/NotoSansCJK*.otf", "/usr/share/fonts/**/NotoSansSC*.otf",
                  "/usr/share/fonts/**/wqy*.ttc", "/usr/share/fonts/**/*CJK*.tt[cf]")


def cjk_font_path() -> str | None:
    for pattern in CJK_FONT_GLOBS:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[0]
    return None


class Fonts:
    """Latin and CJK fonts at one size; warns once, clearly, when no CJK font is installed."""

    def __init__(self, size: int = 14):
        self.latin_path = latin_font_path()
        self.latin = ImageFont.truetype(self.latin_path, size, layout_engine=ImageFont.Layout.BASIC)
        self.cjk_path = cjk_font_path()
        if self.cjk_path is None:
            warnings.warn("no CJK font found (run `make setup`, which installs fonts-noto-cjk): Chinese OCR "
                          "images are drawn with DejaVu Sans and show empty boxes instead of characters",
                          stacklevel=2)
            self.cjk = self.latin
        else:
            self.cjk = ImageFont.truetype(self.cjk_path, size, index=_sc_index(self.cjk_path),
                                          layout_engine=ImageFont.Layout.BASIC)

    def for_lang(self, lang: str) -> ImageFont.FreeTypeFont:
        return self.cjk if lang == "zh" else self.latin


def _sc_index(path: str) -> int:
    """The Simplified Chinese face of a font collection (Noto's .ttc holds JP, KR, SC, TC, HK)."""
    if not path.endswith(".ttc"):
        return 0
    for i in range(10):
        try:
            name = ImageFont.truetype(path, 10, index=i).getname()[0]
        except OSError:
            break
        if name.endswith(" SC"):
            return i
    return 0


def jpeg_pages(count: int, side: int = 448, grain: int = 28, seed: int = 0) -> list[bytes]:
    """`count` side × side JPEG images (quality 90) of random grain × grain noise scaled up: the
    size of a page scan (≈ 57 kB at 448² from 56² noise) for memory and decode measurements."""
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(count):
        buf = io.BytesIO()
        small = rng.integers(0, 255, (grain, grain, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=90)
        pages.append(buf.getvalue())
    return pages


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _wrap(text: str, lang: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    units = list(text) if lang == "zh" else text.split(" ")
    sep = "" if lang == "zh" else " "
    lines, line = [], ""
    for u in units:
        trial = f"{line}{sep}{u}" if line else u
        if font.getlength(trial) <= width - 8 or not line:
            line = trial
        else:
            lines.append(line)
            line = u
    return lines + [line]


def render_text(text: str, lang: str, fonts: Fonts, width: int = 112, max_lines: int = 4) -> Image.Image:
    """Dark text on a light background, wrapped by words (by characters for Chinese). The image is
    `width` px wide, or wider in steps of 56 px when the text needs more than `max_lines` lines:
    the whole text is always in the image, since it is the OCR target. Height is a multiple of
    28 px (Qwen2-VL's patch·merge size)."""
    font = fonts.for_lang(lang)
    lines = _wrap(text, lang, font, width)
    while len(lines) > max_lines and width < 448:
        width += 56
        lines = _wrap(text, lang, font, width)
    line_h = font.size + 6
    height = max(28, -(-(len(lines) * line_h + 8) // 28) * 28)
    img = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    for i, ln in enumerate(lines):
        draw.text((4, 4 + i * line_h), ln, font=font, fill=(20, 20, 30))
    return img


# ---------------------------------------------------------------- scenes
SHAPES = [("hình tròn", "circle", "圆形"), ("hình vuông", "square", "正方形"), ("hình tam giác", "triangle", "三角形")]
SHAPES_PLURAL_EN = ("circles", "squares", "triangles")
COLOURS = [("đỏ", "red", "红色", (220, 40, 40)), ("xanh lá", "green", "绿色", (40, 170, 60)),
           ("xanh dương", "blue", "蓝色", (40, 80, 220)), ("vàng", "yellow", "黄色", (235, 200, 30)),
           ("tím", "purple", "紫色", (140, 60, 180)), ("đen", "black", "黑色", (25, 25, 25))]
ROWS = [("hàng trên", "top", "上排"), ("hàng giữa", "middle", "中排"), ("hàng dưới", "bottom", "下排")]
COLS = [("bên trái", "left", "左边"), ("ở giữa", "centre", "中间"), ("bên phải", "right", "右边")]
NUM_VI = ["không", "một", "hai", "ba", "bốn", "năm"]
NUM_EN = ["no", "one", "two", "three", "four", "five"]
NUM_ZH = ["零", "一", "两", "三", "四", "五"]


def new_scene(rng: random.Random) -> list[tuple[int, int, int]]:
    """1–5 shapes (kind, colour, cell 0..8) in distinct cells of a 3×3 grid."""
    cells = rng.sample(range(9), rng.randint(1, 5))
    return [(rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS)), c) for c in cells]


def draw_scene(scene: list[tuple[int, int, int]], rng: random.Random, size: int = 112) -> Image.Image:
    bg = rng.choice([(255, 255, 255), (238, 238, 238), (245, 240, 225)])
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for kind, colour, c in scene:
        cx, cy = (c % 3 + 0.5) * cell + rng.uniform(-2, 2), (c // 3 + 0.5) * cell + rng.uniform(-2, 2)
        r = cell * rng.uniform(0.28, 0.38)
        fill = COLOURS[colour][3]
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return img


def _where(cell: int, lang: str) -> str:
    row, col = ROWS[cell // 3][LI[lang]], COLS[cell % 3][LI[lang]]
    if lang == "vi":
        return f"ở {row}, {col}"
    if lang == "en":
        return f"in the {row} row, on the {col}" if col != "centre" else f"in the {row} row, in the centre"
    return f"在{row}{col}"


def _shape_name(kind: int, colour: int, lang: str) -> str:
    k, c = SHAPES[kind][LI[lang]], COLOURS[colour][LI[lang]]
    return {"vi": f"{k} màu {c}", "en": f"{c} {k}", "zh": f"{c}的{k}"}[lang]


def _count_phrase(n: int, kind: int, lang: str) -> str:
    if lang == "vi":
        return f"{NUM_VI[n]} {SHAPES[kind][0]}" if n else f"không có {SHAPES[kind][0]} nào"
    if lang == "en":
        noun = SHAPES[kind][1] if n == 1 else SHAPES_PLURAL_EN[kind]
        return f"{NUM_EN[n]} {noun}"
    return f"{NUM_ZH[n]}个{SHAPES[kind][2]}" if n else f"没有{SHAPES[kind][2]}"


def scene_question(scene, rng: random.Random, lang: str, avoid: set[str] = frozenset()) -> tuple[str, str, str, str]:
    """(kind of question, question, answer, a wrong answer) whose answer follows from `scene`."""
    kinds_count = Counter(k for k, _, _ in scene)
    pairs_count = Counter((k, c) for k, c, _ in scene)
    options = ["count", "total", "presence"]
    if any(n == 1 for n in kinds_count.values()):
        options.append("colour")
    if any(n == 1 for n in pairs_count.values()):
        options.append("position")
    options = [o for o in options if o not in avoid] or options
    q = rng.choice(options)
    if q == "count":
        kind = rng.randrange(len(SHAPES))
        n = kinds_count[kind]
        wrong = n + 1 if n < 4 else n - 1
        colours = sorted(COLOURS[c][LI[lang]] for k, c, _ in scene if k == kind)
        if lang == "vi":
            question = f"Có bao nhiêu {SHAPES[kind][0]} trong ảnh?"
            detail = f": {', '.join('màu ' + c for c in colours)}" if n else ""
            answer, neg = f"Có {_count_phrase(n, kind, lang)}{detail}." if n else f"Trong ảnh {_count_phrase(0, kind, lang)}.", \
                f"Có {_count_phrase(wrong, kind, lang)}."
        elif lang == "en":
            question = f"How many {SHAPES_PLURAL_EN[kind]} are in the picture?"
            detail = f": {', '.join(colours)}" if n else ""
            answer, neg = _cap(f"there {'is' if n == 1 else 'are'} {_count_phrase(n, kind, lang)}{detail}."), \
                _cap(f"there {'is' if wrong == 1 else 'are'} {_count_phrase(wrong, kind, lang)}.")
        else:
            question = f"图中有几个{SHAPES[kind][2]}？"
            detail = f"：{'、'.join(colours)}" if n else ""
            answer, neg = (f"图中有{_count_phrase(n, kind, lang)}{detail}。" if n else f"图中{_count_phrase(0, kind, lang)}。"), \
                f"图中有{_count_phrase(wrong, kind, lang)}。"
    elif q == "total":
        n = len(scene)
        wrong = n + 1 if n < 5 else n - 1
        question = {"vi": "Trong ảnh có tất cả bao nhiêu hình?", "en": "How many shapes are there in total?",
                    "zh": "图中一共有几个图形？"}[lang]
        answer = {"vi": f"Có tất cả {NUM_VI[n]} hình.", "en": f"There {'is' if n == 1 else 'are'} {NUM_EN[n]} shape{'s' if n > 1 else ''} in total.",
                  "zh": f"一共有{NUM_ZH[n]}个图形。"}[lang]
        neg = {"vi": f"Có tất cả {NUM_VI[wrong]} hình.", "en": f"There are {NUM_EN[wrong]} shapes in total.",
               "zh": f"一共有{NUM_ZH[wrong]}个图形。"}[lang]
    elif q == "presence":
        kind, colour = rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS))
        present = [cell for k, c, cell in scene if (k, c) == (kind, colour)]
        name = _shape_name(kind, colour, lang)
        question = {"vi": f"Trong ảnh có {name} không?", "en": f"Is there a {name} in the picture?",
                    "zh": f"图中有{name}吗？"}[lang]
        yes = {"vi": f"Có, {name} {_where(present[0], lang)}." if present else "",
               "en": _cap(f"yes, the {name} is {_where(present[0], lang)}.") if present else "",
               "zh": f"有，{name}{_where(present[0], lang)}。" if present else ""}[lang]
        no = {"vi": f"Không, trong ảnh không có {name}.", "en": f"No, there is no {name} in the picture.",
              "zh": f"没有，图中没有{name}。"}[lang]
        answer, neg = (yes, no) if present else (no, {"vi": f"Có, trong ảnh có {name}.",
                                                       "en": f"Yes, there is a {name}.", "zh": f"有，图中有{name}。"}[lang])
    elif q == "colour":
        kind = rng.choice(sorted(k for k, n in kinds_count.items() if n == 1))
        colour, cell = next((c, cell) for k, c, cell in scene if k == kind)
        wrong = _other(rng, len(COLOURS), colour)
        shape = SHAPES[kind][LI[lang]]
        question = {"vi": f"{_cap(shape)} có màu gì?", "en": f"What colour is the {shape}?", "zh": f"{shape}是什么颜色的？"}[lang]
        answer = {"vi": f"{_cap(shape)} {_where(cell, lang)} có màu {COLOURS[colour][0]}.",
                  "en": f"The {shape} {_where(cell, lang)} is {COLOURS[colour][1]}.",
                  "zh": f"{_where(cell, lang)}的{shape}是{COLOURS[colour][2]}。"}[lang]
        neg = {"vi": f"{_cap(shape)} có màu {COLOURS[wrong][0]}.", "en": f"The {shape} is {COLOURS[wrong][1]}.",
               "zh": f"{shape}是{COLOURS[wrong][2]}。"}[lang]
    else:  # position
        kind, colour = rng.choice(sorted(kc for kc, n in pairs_count.items() if n == 1))
        cell = next(cell for k, c, cell in scene if (k, c) == (kind, colour))
        wrong_cell = _other(rng, 9, cell)
        name = _shape_name(kind, colour, lang)
        question = {"vi": f"{_cap(name)} ở đâu?", "en": f"Where is the {name}?", "zh": f"{name}在哪里？"}[lang]
        answer = {"vi": f"{_cap(name)} {_where(cell, lang)}.", "en": f"The {name} is {_where(cell, lang)}.",
                  "zh": f"{name}{_where(cell, lang)}。"}[lang]
        neg = {"vi": f"{_cap(name)} {_where(wrong_cell, lang)}.", "en": f"The {name} is {_where(wrong_cell, lang)}.",
               "zh": f"{name}{_where(wrong_cell, lang)}。"}[lang]
    return q, question, answer, neg


TURN_LABELS = {"vi": ("Hỏi", "Đáp"), "en": ("Q", "A"), "zh": ("问", "答")}


# ---------------------------------------------------------------- one row per task
def text_pair_row(rng: random.Random, lang: str, fonts: Fonts) -> dict[str, Any]:
    a = _random_slots(rng)
    shared = rng.randrange(5)  # how many of the 4 slots the positive keeps
    keep = set(rng.sample(range(4), shared))
    b = tuple(a[i] if i in keep else _other(rng, len(SLOTS[i]), a[i]) for i in range(4))
    pos_lang = lang if rng.random() >= 0.2 else rng.choice([x for x in LANGS3 if x != lang])
    ta = rng.randrange(3)
    tb = _other(rng, 3, ta) if pos_lang == lang else rng.randrange(3)
    return make_row(task="text_pair", lang=lang, query_text=sentence(a, lang, ta),
                    pos_text=sentence(b, pos_lang, tb), score=shared / 4)


def instr_row(rng: random.Random, lang: str, fonts: Fonts) -> dict[str, Any]:
    slots = _random_slots(rng)
    s, a, p, t = (vocab[i][LI[lang]] for vocab, i in zip(SLOTS, slots))
    kind = rng.randrange(3)
    target = sentence(slots, lang, rng.randrange(3))
    if kind == 0:
        query = {"vi": f"Tìm câu kể về người {a} {p}.", "en": f"Find the sentence about someone who {a} {p}.",
                 "zh": f"找出描述有人{p}{a}的句子。"}[lang]
    elif kind == 1:
        query = {"vi": f"Trả lời câu hỏi: Ai {a} {p} {t}?", "en": f"Answer the question: who {a} {p} {t}?",
                 "zh": f"回答问题：谁{t}{p}{a}？"}[lang]
    else:
        to = rng.choice([x for x in LANGS3 if x != lang])
        names = {"vi": {"en": "tiếng Anh", "zh": "tiếng Trung", "vi": "tiếng Việt"},
                 "en": {"vi": "Vietnamese", "zh": "Chinese", "en": "English"},
                 "zh": {"vi": "越南语", "en": "英语", "zh": "中文"}}[lang]
        source = sentence(slots, lang, rng.randrange(3))
        query = {"vi": f"Dịch sang {names[to]}: {source}", "en": f"Translate into {names[to]}: {source}",
                 "zh": f"翻译成{names[to]}：{source}"}[lang]
        target = sentence(slots, to, 0)
    return make_row(task="instr", lang=lang, query_text=query, pos_text=target)


def ocr_row(rng: random.Random, lang: str, fonts: Fonts) -> dict[str, Any]:
    slots = _random_slots(rng)
    kind = rng.randrange(3)
    if kind == 0:  # a short label: who does what
        text = _cap(f"{SUBJECTS[slots[0]][LI[lang]]} {ACTIONS[slots[1]][LI[lang]]}") if lang != "zh" else \
            SUBJECTS[slots[0]][2] + ACTIONS[slots[1]][2]
    elif kind == 1:  # a sign: where and when
        text = _cap(f"{PLACES[slots[2]][LI[lang]]} {TIMES[slots[3]][LI[lang]]}") if lang != "zh" else \
            TIMES[slots[3]][2] + PLACES[slots[2]][2]
    else:
        text = sentence(slots, lang, 0)
    other = sentence(tuple(_other(rng, len(v), i) for v, i in zip(SLOTS, slots)), lang, 0)
    return make_row(task="ocr", lang=lang, query_images=[png(render_text(text, lang, fonts))], pos_text=text,
                    neg_text=[other])


def vqa_single_row(rng: random.Random, lang: str, fonts: Fonts) -> dict[str, Any]:
    scene = new_scene(rng)
    _, question, answer, neg = scene_question(scene, rng, lang)
    return make_row(task="vqa_single", lang=lang, query_text=question,
                    query_images=[png(draw_scene(scene, rng))], pos_text=answer, neg_text=[neg])


def vqa_multi_row(rng: random.Random, lang: str, fonts: Fonts) -> dict[str, Any]:
    scene = new_scene(rng)
    q_label, a_label = TURN_LABELS[lang]
    colon = "：" if lang == "zh" else ": "
    turns, asked = [], set()
    for _ in range(rng.randint(2, 4)):
        kind, question, answer, neg = scene_question(scene, rng, lang, avoid=asked)
        asked.add(kind)
        turns.append((question, answer, neg))
    history = [f"{q_label}{colon}{q}\n{a_label}{colon}{a}" for q, a, _ in turns[:-1]]
    query = "\n".join(history + [f"{q_label}{colon}{turns[-1][0]}"])
    return make_row(task="vqa_multi", lang=lang, query_text=query, query_images=[png(draw_scene(scene, rng))],
                    pos_text=turns[-1][1], neg_text=[turns[-1][2]])


MAKERS: dict[str, Callable[[random.Random, str, Fonts], dict[str, Any]]] = {
    "text_pair": text_pair_row, "instr": instr_row, "ocr": ocr_row, "vqa_single": vqa_single_row,
    "vqa_multi": vqa_multi_row,
}


# ---------------------------------------------------------------- generation
def split_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of n by shares: exact totals, each within 1 of n·share."""
    total = sum(shares.values())
    raw = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(r) for k, r in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], list(raw).index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def generate(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS, fonts: Fonts | None = None):
    """Yield (task, rows) for each task: n rows in all, tasks equal, languages 60/30/10 each."""
    fonts = fonts or Fonts()
    for task, n_task in split_counts(n, {t: 1.0 for t in tasks}).items():
        rng = random.Random(f"vipoly-synthetic/{seed}/{task}")
        langs = [lang for lang, k in split_counts(n_task, LANG_SHARES).items() for _ in range(k)]
        rng.shuffle(langs)
        rows = []
        for i, lang in enumerate(langs):
            row = MAKERS[task](rng, lang, fonts)
            row["id"] = f"syn-{seed}-{task}-{i:07d}"
            checked, reason = check_row(row)
            if reason:  # a generator bug, not bad input: fail loudly
                raise AssertionError(f"synthetic row {row['id']} is invalid: {reason}")
            rows.append(checked)
        yield task, rows


def write_synthetic(out: str | Path, n: int, seed: int = 0, rows_per_file: int = 2048,
                    tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """Generate and write the shards + manifest; returns the manifest."""
    out = Path(out)
    for t in TASKS:
        for old in (out / t).glob("part-*.parquet") if (out / t).is_dir() else []:
            old.unlink()  # a rerun replaces, never mixes with, earlier output
    out.mkdir(parents=True, exist_ok=True)
    fonts = Fonts()
    writer = ShardWriter(out, prefix="syn", rows_per_file=rows_per_file, row_group_rows=256)
    for task, rows in generate(n, seed, tasks, fonts):
        for start in range(0, len(rows), 1024):
            writer.write(rows_to_table(rows[start:start + 1024]))
    write_quarantine(out, [])
    return write_manifest(out, writer.close(), format="synthetic", seed=seed, n=n, good=n, quarantined=0,
                          fonts={"latin": fonts.latin_path, "cjk": fonts.cjk_path})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m vipoly.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000, help="rows in all (split equally over the tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-file", type=int, default=2048)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of the tasks")
    args = p.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = set(tasks) - set(TASKS)
    if unknown:
        p.error(f"unknown task(s) {sorted(unknown)}; expected {', '.join(TASKS)}")
    m = write_synthetic(args.out, args.n, args.seed, args.rows_per_file, tasks)
    print(f"wrote {m['total_rows']} synthetic rows to {args.out}")
    for task, n in m["rows"].items():
        print(f"  {task:<11} {n:>7} rows  {m['bytes'][task] / 1e6:7.2f} MB  {m['rows_by_lang'][task]}")
    return m


if __name__ == "__main__":
    main()
