"""Word lists of the built-in catalog, in English and Chinese.

Every attribute value has exactly one query word per language, and the word lists are kept
*disjoint*: no colour word, pattern word, material word, brand or category name occurs inside
another list (style words, features, marketing filler). That is what makes the catalog honest:
a title that does not mention the colour really carries no colour evidence, so visual queries can
only be answered from the pixels, and a query string maps back to exactly one attribute combination.

Index order of each tuple is the integer code stored in the attribute arrays; changing the order
changes every generated catalog, so append rather than reorder.
"""

import functools
from typing import NamedTuple


class Category(NamedTuple):
    """A product category: its query name, title synonyms, feature phrases, allowed materials."""

    key: str
    en: str
    en_synonyms: tuple[str, ...]
    zh: str
    zh_synonyms: tuple[str, ...]
    en_features: tuple[str, ...]
    zh_features: tuple[str, ...]
    materials: tuple[str, ...]  # keys of MATERIALS a product of this category can be made of


# (key, en, zh, base RGB). Hue-bearing colours are saturated: the colour is recoverable from pixels.
COLORS: tuple[tuple[str, str, str, tuple[int, int, int]], ...] = (
    ("red", "red", "红色", (205, 30, 35)),
    ("orange", "orange", "橙色", (240, 125, 20)),
    ("yellow", "yellow", "黄色", (240, 210, 35)),
    ("green", "green", "绿色", (35, 155, 60)),
    ("blue", "blue", "蓝色", (30, 75, 205)),
    ("purple", "purple", "紫色", (125, 45, 170)),
    ("pink", "pink", "粉色", (245, 125, 185)),
    ("brown", "brown", "棕色", (120, 72, 38)),
    ("black", "black", "黑色", (28, 28, 30)),
    ("white", "white", "白色", (242, 242, 238)),
)

# (key, en, zh). Keys are what items.jsonl "attributes" store and what the renderer draws.
PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("plain", "solid", "纯色"),
    ("striped", "striped", "条纹"),
    ("dotted", "polka dot", "波点"),
    ("checked", "plaid", "格子"),
    ("gradient", "gradient", "渐变"),
    ("zigzag", "zigzag", "波浪纹"),
)

MATERIALS: tuple[tuple[str, str, str], ...] = (
    ("cotton", "cotton", "纯棉"),
    ("linen", "linen", "亚麻"),
    ("polyester", "polyester", "涤纶"),
    ("silk", "silk", "真丝"),
    ("denim", "denim", "牛仔布"),
    ("wool", "wool", "羊毛"),
    ("leather", "leather", "真皮"),
    ("canvas", "canvas", "帆布"),
    ("nylon", "nylon", "尼龙"),
    ("ceramic", "ceramic", "陶瓷"),
    ("glass", "glass", "玻璃"),
    ("steel", "stainless steel", "不锈钢"),
    ("plastic", "plastic", "塑料"),
)

# Invented brand names (no real trademarks); Zipf-like popularity is applied by the generator.
BRANDS: tuple[tuple[str, str], ...] = (
    ("Nordvik", "北岸"),
    ("Lumora", "森屿"),
    ("Kestrel", "简町"),
    ("Aurelio", "悦然"),
    ("Vantana", "木槿"),
    ("Miyori", "拾光"),
    ("Brookfield", "南风"),
    ("Solenne", "初见"),
    ("Tarrow", "云栖"),
    ("Quillon", "素然"),
    ("Zephra", "原野"),
    ("Halden", "知秋"),
    ("Orlanda", "半岛"),
    ("Castello", "星河"),
    ("Elmwood", "暖阳"),
    ("Fennick", "山川"),
    ("Garrow", "海盐"),
    ("Ivaro", "小满"),
    ("Juniper", "晨曦"),
    ("Marlowe", "米洛"),
)

CATEGORIES: tuple[Category, ...] = (
    Category("tshirt", "t-shirt", ("tee", "top", "tee shirt"), "T恤", ("短袖", "上衣", "打底衫"),
             ("short sleeve", "crew neck", "loose fit", "oversized", "slim fit"),
             ("圆领", "宽松", "修身", "短袖", "夏季百搭"),
             ("cotton", "linen", "polyester", "silk")),
    Category("dress", "dress", ("sundress", "frock", "gown"), "连衣裙", ("长裙", "裙子", "仙女裙"),
             ("sleeveless", "a-line", "midi", "maxi", "high waist", "party"),
             ("无袖", "收腰", "中长款", "气质", "显瘦"),
             ("cotton", "linen", "polyester", "silk")),
    Category("trousers", "trousers", ("pants", "slacks", "chinos"), "长裤",
             ("休闲裤", "裤子", "直筒裤"),
             ("wide leg", "straight leg", "high waist", "ankle length", "drawstring"),
             ("阔腿", "直筒", "高腰", "九分", "垂感"),
             ("cotton", "linen", "denim", "wool", "polyester")),
    Category("skirt", "skirt", ("miniskirt", "pleated skirt", "midi skirt"), "半身裙",
             ("短裙", "百褶裙", "A字裙"),
             ("pleated", "a-line", "mini", "midi", "high waist"),
             ("百褶", "A字", "短款", "高腰", "显瘦"),
             ("cotton", "denim", "wool", "silk", "polyester")),
    Category("sneaker", "sneakers", ("trainers", "running shoes", "sport shoes"), "运动鞋",
             ("休闲鞋", "板鞋", "跑步鞋"),
             ("running", "breathable", "lace-up", "non-slip", "low cut"),
             ("跑步", "透气", "系带", "防滑", "低帮"),
             ("leather", "canvas", "nylon")),
    Category("handbag", "handbag", ("purse", "tote bag", "shoulder bag"), "手提包",
             ("女包", "挎包", "托特包"),
             ("tote", "crossbody", "large capacity", "zipper", "hand carry"),
             ("单肩", "斜挎", "大容量", "拉链", "通勤"),
             ("leather", "canvas", "nylon")),
    Category("cap", "cap", ("baseball cap", "hat", "sun hat"), "棒球帽",
             ("鸭舌帽", "帽子", "遮阳帽"),
             ("adjustable", "sun protection", "curved brim", "outdoor"),
             ("可调节", "防晒", "弯檐", "遮阳"),
             ("cotton", "wool", "canvas")),
    Category("mug", "mug", ("coffee mug", "cup", "tea cup"), "马克杯", ("咖啡杯", "茶杯", "杯子"),
             ("350ml", "microwave safe", "with handle", "office", "gift box"),
             ("咖啡", "办公室", "350ml", "带把手", "可微波"),
             ("ceramic", "glass", "steel")),
    Category("backpack", "backpack", ("rucksack", "school bag", "daypack"), "双肩包",
             ("书包", "背包", "旅行包"),
             ("laptop", "travel", "large capacity", "waterproof", "school"),
             ("学生", "电脑", "旅行", "大容量", "防水"),
             ("canvas", "nylon", "leather", "polyester")),
    Category("umbrella", "umbrella", ("parasol", "rain umbrella", "sun umbrella"), "雨伞",
             ("遮阳伞", "晴雨伞", "折叠伞"),
             ("folding", "windproof", "UV protection", "compact", "automatic"),
             ("折叠", "防风", "防晒", "便携", "全自动"),
             ("nylon", "polyester")),
    Category("bottle", "water bottle", ("flask", "sports bottle", "drink bottle"), "水瓶",
             ("水壶", "运动水壶", "随手瓶"),
             ("500ml", "leakproof", "sports", "insulated", "portable"),
             ("500ml", "防漏", "运动", "保温", "便携"),
             ("glass", "steel", "plastic")),
    Category("lamp", "desk lamp", ("table lamp", "reading lamp", "night light"), "台灯",
             ("床头灯", "护眼灯", "阅读灯"),
             ("LED", "bedside", "dimmable", "eye care", "USB"),
             ("护眼", "床头", "阅读", "LED", "可调光"),
             ("ceramic", "glass", "plastic")),
)

EN_STYLES = ("casual", "vintage", "minimalist", "korean style", "streetwear", "elegant", "classic",
             "sporty", "retro", "boho", "trendy", "preppy", "basic", "chic")
ZH_STYLES = ("休闲", "复古", "简约", "韩版", "街头", "优雅", "经典", "运动风", "文艺", "通勤",
             "潮流", "学院风", "百搭", "ins风")
EN_AUDIENCES = ("women's", "men's", "unisex", "kids'", "for women", "for men", "ladies")
ZH_AUDIENCES = ("女士", "男士", "男女同款", "儿童", "女款", "男款", "情侣款")
EN_SEASONS = ("2024 new", "2025 new arrival", "summer", "spring autumn", "new season", "latest",
              "winter")
ZH_SEASONS = ("2024新款", "2025新品", "夏季", "春秋款", "新款", "秋冬", "当季")
EN_FILLERS = ("free shipping", "hot sale", "best seller", "high quality", "gift idea",
              "limited offer", "factory direct", "fashion", "premium", "lightweight", "durable",
              "comfortable", "plus size", "official store", "genuine", "daily use")
ZH_FILLERS = ("包邮", "热卖", "爆款", "高品质", "送礼", "限时特惠", "厂家直销", "时尚", "轻便",
              "耐用", "舒适", "大码", "官方旗舰店", "正品", "日常", "新品上市")


@functools.cache
def word_lists(lang: str) -> dict[str, tuple[str, ...]]:
    """Query words of every attribute for `lang`, indexed by attribute code (cached: read-only)."""
    i = 1 if lang == "en" else 2
    return {
        "category": tuple(c.en if lang == "en" else c.zh for c in CATEGORIES),
        "color": tuple(c[i] for c in COLORS),
        "pattern": tuple(p[i] for p in PATTERNS),
        "material": tuple(m[i] for m in MATERIALS),
        "brand": tuple(b[0].lower() if lang == "en" else b[1] for b in BRANDS),
    }
