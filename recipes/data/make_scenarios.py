"""Generate the data of the seed scenarios (every recipe but chat-lora, which has make_chat_lora.py).

    python recipes/data/make_scenarios.py            # rewrites recipes/data/<scenario>/{train,eval}.jsonl

domain-adapt is real text: the Python documentation topics that ship with CPython (`pydoc_data.topics`, PSF
licence); whole topics are held out, so eval text is never a paragraph seen in training. The other scenarios are
seeded generators (seed 0, reruns give identical files). Each keeps names, words and some phrasings out of train so
that the eval split is not a template copy of the training split:

    classify   customer messages -> one of six intents (decoder: label by generation; encoder: {"text", "label"})
    ner        sentences with people, places, organisations and dates, IOB2 word tags ({"tokens", "tags"})
    translate  English -> Spanish sentences from a small agreement-aware grammar (gender, number, adjective order)
    qa         a short passage about a fictional place or firm, a question, the answer span from the passage
    creative   slogans under stated constraints (word range, required words, first word, final punctuation)
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).parent


def _write(name: str, rows: dict[str, list[dict]]) -> None:
    d = OUT / name
    d.mkdir(exist_ok=True)
    for split, xs in rows.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in xs))


def _halves(xs: list, frac: float = 0.75) -> tuple[list, list]:
    k = int(len(xs) * frac)
    return xs[:k], xs[k:]


def _chat(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


# ------------------------------------------------------------------------------------------------- domain-adapt
def domain_adapt(chunk_chars: int = 700, n_train: int = 480, n_eval: int = 48) -> None:
    from pydoc_data.topics import topics

    def chunks(text: str) -> list[str]:
        out, cur = [], ""
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            if not para:
                continue
            if cur and len(cur) + len(para) > chunk_chars:
                out.append(cur)
                cur = ""
            cur = (cur + "\n\n" + para).strip()[: chunk_chars * 2]
        return out + ([cur] if len(cur) > 200 else [])

    keys = sorted(topics)
    held = set(keys[::6])  # every sixth topic, whole, is eval only
    train = [c for k in keys if k not in held for c in chunks(topics[k])]
    seen = set(train)  # some topics repeat passages of others: such chunks stay out of eval
    ev = [c for k in keys if k in held for c in chunks(topics[k]) if c not in seen]
    rng = random.Random(0)
    rng.shuffle(train)
    rng.shuffle(ev)
    _write("domain-adapt", {"train": [{"text": t} for t in train[:n_train]], "eval": [{"text": t} for t in ev[:n_eval]]})


# ----------------------------------------------------------------------------------------------------- classify
INTENTS = {
    "billing": ["I was charged twice for {item} this month.", "Why is my invoice for {item} higher than last time?",
                "The payment for {item} went through but my card shows two charges.",
                "Can you explain the extra fee on my {item} bill?", "My bank statement lists {item} three times.",
                "You billed me for {item} after I cancelled.",
                # held out of train:
                "There is a charge from you for {item} that I never agreed to.",
                "How come the {item} subscription costs more on this statement?"],
    "delivery": ["My {item} still hasn't arrived after two weeks.", "The tracking page for my {item} stopped updating.",
                 "The courier left my {item} at the wrong address.", "When will the {item} I ordered be shipped?",
                 "The parcel with my {item} came without a box.", "Delivery of the {item} keeps being postponed.",
                 "Where exactly is the package with my {item} right now?",
                 "The {item} was supposed to be here on Monday and it's Friday."],
    "login": ["I can't sign in to my account since the update.", "The password reset email never comes.",
              "It says my account is locked after I tried to log in.", "The two-factor code is always rejected.",
              "I forgot which email I used to register for {item}.", "The login page just reloads when I press enter.",
              "My username is not recognised any more.", "The app logs me out every few minutes."],
    "refund": ["I'd like my money back for the {item}.", "Please refund the {item}, it doesn't fit.",
               "How long does a refund for the {item} take?", "I returned the {item} but got no refund yet.",
               "Can I get a refund if I already opened the {item}?", "I want to return the {item} for a full refund.",
               "The {item} was a gift and I'd rather have the money.", "Reimburse me for the {item}, please."],
    "bug": ["The app crashes whenever I open the {item} page.", "The search box returns nothing for {item}.",
            "Prices on the {item} page show as NaN.", "The checkout button does nothing on my phone.",
            "Images of the {item} don't load in the browser.", "The {item} filter resets every time I scroll.",
            "Adding the {item} to the basket throws an error message.", "The screen freezes on the {item} listing."],
    "praise": ["The {item} is fantastic, thank you!", "Your support team sorted my {item} question in minutes.",
               "Loving the new {item}, great quality.", "Just wanted to say the {item} arrived beautifully packed.",
               "Best {item} I have bought in years.", "Thanks for the quick help with my {item}!",
               "My kids adore the {item}, well done.", "The {item} exceeded what I expected."],
}
ITEMS = ["headphones", "yoga mat", "coffee grinder", "desk lamp", "rain jacket", "blender", "phone case", "backpack",
         "kettle", "monitor", "bike helmet", "water bottle", "notebook", "keyboard", "tent", "sofa cover",
         "air fryer", "sun hat", "camera strap", "printer", "plant pot", "hiking boots", "toaster", "scarf"]
OPENERS = ["", "", "Hi, ", "Hello, ", "Hey team, ", "Good morning. ", "Quick question: ", "Urgent: "]
CLOSERS = ["", "", " Thanks.", " Order 4471.", " Please help.", " Regards, Sam", " This is the second time."]
CLASSIFY_SYSTEM = ("Classify the customer message into exactly one intent: billing, delivery, login, refund, bug, "
                   "praise. Answer with the intent only.")


def classify(n_train: int = 480, n_eval: int = 96) -> None:
    rng = random.Random(1)
    items_tr, items_ev = _halves(ITEMS)

    def one(train: bool) -> dict:
        label = rng.choice(sorted(INTENTS))
        tpl = rng.choice(INTENTS[label][:6] if train else INTENTS[label])
        text = rng.choice(OPENERS) + tpl.format(item=rng.choice(items_tr if train else items_ev)) + rng.choice(CLOSERS)
        return {"text": text, "label": label}

    rows = {"train": [one(True) for _ in range(n_train)], "eval": []}
    seen = {r["text"] for r in rows["train"]}
    while len(rows["eval"]) < n_eval:  # messages without a product can repeat: keep train's out of eval
        r = one(False)
        if r["text"] not in seen:
            rows["eval"].append(r)
    _write("classify-encoder", rows)
    _write("classify", {s: [_chat(CLASSIFY_SYSTEM, r["text"], r["label"]) for r in xs] for s, xs in rows.items()})


# ---------------------------------------------------------------------------------------------------------- ner
PEOPLE = ["Maria Silva", "John Okoro", "Aisha Rahman", "Lars Eriksen", "Chen Wei", "Sofia Marin", "David Levi",
          "Keiko Mori", "Pedro Alves", "Anna Kowalska", "Tunde Bakare", "Elif Demir", "Marco Bianchi", "Nadia Petrov",
          "Omar Sayed", "Hannah Vogel", "Ravi Menon", "Lucy Grant", "Ivan Horvat", "Amina Diallo", "Jonas Weber",
          "Grace Mensah", "Paulo Costa", "Mira Novak"]
PLACES = ["Lisbon", "Nairobi", "Toronto", "Kraków", "Osaka", "Valparaíso", "Glasgow", "Izmir", "Hanoi", "Porto Alegre",
          "Tbilisi", "Cape Town", "Bilbao", "Tromsø", "Daegu", "Leipzig", "Mombasa", "Rosario", "Tampere", "Cebu"]
ORGS = ["Northwind Labs", "Blue River Bank", "Atlas Freight", "Helios Energy", "Greenleaf Foods", "Kestrel Air",
        "Orion Health", "Summit Textiles", "Nova Robotics", "Harbor Media", "Quartz Mining", "Cedar Pharma",
        "Lumen Solar", "Vantage Rail", "Iris Telecom", "Maple Insurance"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NER_TEMPLATES = [
    "{PER} joined {ORG} in {LOC} on {DATE} .", "On {DATE} , {ORG} opened a new office in {LOC} .",
    "{PER} flew from {LOC} to {LOC} last week .", "The contract between {ORG} and {ORG} was signed on {DATE} .",
    "According to {PER} , {ORG} will hire forty engineers in {LOC} .", "{PER} met {PER} at the {ORG} stand .",
    "Shares of {ORG} fell sharply after {DATE} .", "{PER} , who grew up in {LOC} , now leads {ORG} .",
    "A storm closed the port of {LOC} on {DATE} .", "{ORG} appointed {PER} as chief executive .",
    # held out of train:
    "Reporters in {LOC} asked {PER} whether {ORG} would move .", "By {DATE} {PER} had left {LOC} for good .",
]


def _date(rng: random.Random) -> str:
    return rng.choice([f"{rng.randint(1, 28)} {rng.choice(MONTHS)}", f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
                       f"{rng.choice(MONTHS)} {rng.randint(1990, 2030)}"])


def ner(n_train: int = 480, n_eval: int = 96) -> None:
    rng = random.Random(2)
    pools = {k: _halves(v) for k, v in {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}.items()}

    def one(train: bool) -> dict:
        tpl = rng.choice(NER_TEMPLATES[:10] if train else NER_TEMPLATES)
        tokens, tags = [], []
        for piece in tpl.split():
            m = re.fullmatch(r"\{(\w+)\}", piece)
            if not m:
                tokens.append(piece)
                tags.append("O")
                continue
            kind = m.group(1)
            value = _date(rng) if kind == "DATE" else rng.choice(pools[kind][0 if train else 1])
            for i, w in enumerate(value.split()):
                tokens.append(w)
                tags.append(("B-" if i == 0 else "I-") + kind)
        return {"tokens": tokens, "tags": tags}

    _write("ner", {"train": [one(True) for _ in range(n_train)], "eval": [one(False) for _ in range(n_eval)]})


# ---------------------------------------------------------------------------------------------------- translate
# noun: (English singular, English plural, Spanish singular, Spanish plural, gender)
NOUNS = [("cat", "cats", "gato", "gatos", "m"), ("dog", "dogs", "perro", "perros", "m"),
         ("woman", "women", "mujer", "mujeres", "f"), ("man", "men", "hombre", "hombres", "m"),
         ("teacher", "teachers", "profesora", "profesoras", "f"), ("boy", "boys", "niño", "niños", "m"),
         ("girl", "girls", "niña", "niñas", "f"), ("doctor", "doctors", "médico", "médicos", "m"),
         ("neighbour", "neighbours", "vecina", "vecinas", "f"), ("student", "students", "estudiante", "estudiantes", "m")]
THINGS = [("book", "books", "libro", "libros", "m"), ("house", "houses", "casa", "casas", "f"),
          ("window", "windows", "ventana", "ventanas", "f"), ("car", "cars", "coche", "coches", "m"),
          ("letter", "letters", "carta", "cartas", "f"), ("table", "tables", "mesa", "mesas", "f"),
          ("apple", "apples", "manzana", "manzanas", "f"), ("door", "doors", "puerta", "puertas", "f"),
          ("bread", "breads", "pan", "panes", "m"), ("chair", "chairs", "silla", "sillas", "f"),
          ("key", "keys", "llave", "llaves", "f"), ("box", "boxes", "caja", "cajas", "f")]
# adjective: (English, Spanish masculine singular, feminine singular)
ADJS = [("red", "rojo", "roja"), ("old", "viejo", "vieja"), ("new", "nuevo", "nueva"), ("small", "pequeño", "pequeña"),
        ("white", "blanco", "blanca"), ("black", "negro", "negra"), ("tall", "alto", "alta"), ("cheap", "barato", "barata")]
# verb: (English 3sg, English plural, Spanish 3sg, Spanish 3pl)
VERBS = [("buys", "buy", "compra", "compran"), ("cleans", "clean", "limpia", "limpian"),
         ("paints", "paint", "pinta", "pintan"), ("needs", "need", "necesita", "necesitan"),
         ("carries", "carry", "lleva", "llevan"), ("looks for", "look for", "busca", "buscan"),
         ("sells", "sell", "vende", "venden"), ("opens", "open", "abre", "abren"), ("wants", "want", "quiere", "quieren")]
PLACES_ES = [("in the kitchen", "en la cocina"), ("in the garden", "en el jardín"), ("at the market", "en el mercado"),
             ("every morning", "cada mañana"), ("today", "hoy"), ("at night", "por la noche")]
TRANSLATE_SYSTEM = "Translate the English sentence into Spanish. Answer with the translation only."


def _np(rng: random.Random, noun, plural: bool, adj_p: float) -> tuple[str, str]:
    en_s, en_p, es_s, es_p, g = noun
    art_en = "the" if plural or rng.random() < 0.6 else "a"
    art_es = {("m", False, "the"): "el", ("f", False, "the"): "la", ("m", True, "the"): "los",
              ("f", True, "the"): "las", ("m", False, "a"): "un", ("f", False, "a"): "una"}[(g, plural, art_en)]
    en, es = (en_p if plural else en_s), (es_p if plural else es_s)
    if rng.random() < adj_p:
        a_en, a_m, a_f = rng.choice(ADJS)
        a_es = (a_m if g == "m" else a_f) + ("s" if plural else "")
        return f"{art_en} {a_en} {en}", f"{art_es} {es} {a_es}"
    return f"{art_en} {en}", f"{art_es} {es}"


def _sentence(rng: random.Random, train: bool) -> tuple[str, str]:
    subj_pl, obj_pl = rng.random() < 0.4, rng.random() < 0.4
    s_en, s_es = _np(rng, rng.choice(NOUNS), subj_pl, 0.4)
    o_en, o_es = _np(rng, rng.choice(THINGS), obj_pl, 0.5)
    v = rng.choice(VERBS)
    neg = rng.random() < (0.15 if train else 0.3)
    if neg:
        v_en = ("do not " if subj_pl else "does not ") + v[1]
        v_es = "no " + (v[3] if subj_pl else v[2])
    else:
        v_en, v_es = (v[1] if subj_pl else v[0]), (v[3] if subj_pl else v[2])
    en, es = f"{s_en} {v_en} {o_en}", f"{s_es} {v_es} {o_es}"
    if rng.random() < 0.5:
        p_en, p_es = rng.choice(PLACES_ES)
        en, es = f"{en} {p_en}", f"{es} {p_es}"
    return en[0].upper() + en[1:] + ".", es[0].upper() + es[1:] + "."


def translate(n_train: int = 480, n_eval: int = 64) -> None:
    rng = random.Random(3)
    seen, rows = set(), {"train": [], "eval": []}
    for split, n in (("train", n_train), ("eval", n_eval)):
        while len(rows[split]) < n:
            en, es = _sentence(rng, split == "train")
            if en in seen:  # eval sentences never occur in train
                continue
            seen.add(en)
            rows[split].append(_chat(TRANSLATE_SYSTEM, en, es))
    _write("translate", rows)


# ----------------------------------------------------------------------------------------------------------- qa
TOWNS = ["Arvelle", "Brinmoor", "Castavon", "Dunhallow", "Elmsk", "Farrowgate", "Glenquist", "Harlowick", "Istral",
         "Jorvanne", "Kelmora", "Lissbury", "Marrowdale", "Norvik", "Oskerby", "Pellmark", "Quenton", "Rastow",
         "Selbrae", "Tavorin", "Ulmsted", "Varnholt", "Wexcombe", "Yarrowby"]
FOUNDERS = ["Edith Crane", "Tomas Reyes", "Ingrid Solberg", "Kofi Asante", "Yara Haddad", "Milan Kovac",
            "Beatrix Lund", "Arturo Vega", "Sunita Rao", "Felix Brandt", "Noemi Farkas", "Hugo Lemaire"]
PRODUCTS = ["wool blankets", "glass beads", "copper kettles", "smoked cheese", "paper lanterns", "oak barrels",
            "clay roof tiles", "linen shirts", "honey wine", "silver thread", "sea salt", "violin strings"]
RIVERS = ["the Avel", "the Dorn", "the Kessa", "the Lune", "the Marro", "the Oster", "the Reeve", "the Tallis"]
QUESTIONS = {
    "founder": ["Who founded {town}?", "Which person established {town}?", "Who is named as the founder of {town}?"],
    "year": ["In which year was {town} founded?", "When was {town} founded?", "What year did {town} begin?"],
    "product": ["What is {town} known for?", "What does {town} produce?", "Which goods made {town} famous?"],
    "river": ["Which river runs through {town}?", "On what river does {town} lie?", "What river flows past {town}?"],
    "population": ["How many people live in {town}?", "What is the population of {town}?",
                   "How large is the population of {town}?"],
}
PASSAGES = [
    "{town} was founded in {year} by {founder}. It lies on {river} and is known for its {product}. "
    "Today about {population} people live there.",
    "Known for its {product}, {town} sits on the banks of {river}. {founder} founded the town in {year}, and its "
    "population is now roughly {population}.",
    "About {population} people call {town} home. The town, which {founder} established in {year} beside {river}, "
    "still trades in {product}.",
    # held out of train:
    "In {year}, {founder} set up a trading post on {river}; it grew into {town}, a place of {population} residents "
    "that is famous for its {product}.",
]
QA_SYSTEM = "Answer the question using only the passage. Answer with the exact words from the passage, nothing else."


def qa(n_train: int = 480, n_eval: int = 64) -> None:
    rng = random.Random(4)
    towns, founders, products = _halves(TOWNS), _halves(FOUNDERS), _halves(PRODUCTS)

    def one(train: bool) -> dict:
        k = 0 if train else 1
        f = {"town": rng.choice(towns[k]), "founder": rng.choice(founders[k]), "product": rng.choice(products[k]),
             "river": rng.choice(RIVERS), "year": str(rng.randint(1120, 1890)),
             "population": f"{rng.randint(2, 95) * 1000 + rng.choice([0, 500]):,}"}
        passage = rng.choice(PASSAGES[:3] if train else PASSAGES).format(**f)
        field = rng.choice(sorted(QUESTIONS))
        qs = QUESTIONS[field][:2] if train else QUESTIONS[field]
        return _chat(QA_SYSTEM, f"Passage: {passage}\nQuestion: {rng.choice(qs).format(town=f['town'])}", f[field])

    _write("qa", {"train": [one(True) for _ in range(n_train)], "eval": [one(False) for _ in range(n_eval)]})


# ----------------------------------------------------------------------------------------------------- creative
GOODS = ["bicycle", "tea", "umbrella", "bakery", "library", "sneaker", "radio", "garden centre", "ferry", "soap",
         "bookshop", "candle", "ice cream", "museum", "laptop", "yoghurt"]
KEYWORDS = ["bright", "morning", "journey", "simple", "together", "fresh", "quiet", "bold", "little", "home",
            "golden", "wild", "calm", "future", "sunny", "honest", "warm", "friends", "city", "light"]
SLOGANS = {  # each must contain both required words; {a} {b} are the required words, {g} the product
    "!": ["{A} days need a {b} {g}!", "Make every {a} moment {b} with our {g}!", "Our {g} keeps things {a} and {b}!",
          "{A} and {b}: that is the {g} way!", "Choose the {g} that feels {a}, stays {b} and lasts!"],
    "?": ["Ready for a {a} {g} that feels {b}?", "Why settle for less than a {a}, {b} {g}?",
          "Who knew a {g} could be so {a} and {b}?"],
    ".": ["A {a} {g} for {b} people.", "The {g} for {a} hearts and {b} plans.", "{A} ideas start with a {b} {g}.",
          "Simply the {g} that makes life {a} and {b}."],
}
PADDING = ["truly", "really", "always", "so", "very"]
ENDS = {"!": "an exclamation mark", "?": "a question mark", ".": "a full stop"}


def _an(s: str) -> str:
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", s)


def _slogan(rng: random.Random, goods: list, words: list, train: bool) -> dict:
    end = rng.choice(sorted(SLOGANS))
    tpls = SLOGANS[end][:-1] if train else SLOGANS[end]
    g = rng.choice(goods)
    a, b = rng.sample(words, 2)
    text = _an(rng.choice(tpls).format(a=a, b=b, A=a.capitalize(), g=g))
    n = len(re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", text))
    lo = max(3, n - rng.randint(0, 3))
    hi = max(lo + 2, n + rng.randint(0, 3))
    instr = _an(f"Write a slogan for a {g}. Use between {lo} and {hi} words. "
             f'Use the words "{a}" and "{b}". End with {ENDS[end]}.')
    if rng.random() < 0.3:
        instr += f' Start with the word "{text.split()[0].strip(",:")}".'
    return {"messages": [{"role": "user", "content": instr}, {"role": "assistant", "content": text}]}


def creative(n_train: int = 480, n_eval: int = 64) -> None:
    rng = random.Random(5)
    goods, words = _halves(GOODS), _halves(KEYWORDS)
    _write("creative", {"train": [_slogan(rng, goods[0], words[0], True) for _ in range(n_train)],
                        "eval": [_slogan(rng, goods[1], words[1], False) for _ in range(n_eval)]})


if __name__ == "__main__":
    domain_adapt()
    classify()
    ner()
    translate()
    qa()
    creative()
