"""Generate the general-knowledge sets every decoder recipe uses: what a fine-tune must not forget.

    python recipes/data/make_general.py     # rewrites recipes/data/general/{retention,replay}.jsonl

retention.jsonl: the held-out retention evaluation, scored for base torch, tuned torch, fp32 ONNX and the artifact
under a generic system prompt (toolchain/runtime/retention.py checks each answer by its `kind`):
  fact         everyday facts from the FACTS table below; passes when an accepted answer is in the reply
  number       arithmetic and unit/date questions; passes when the first number in the reply is the answer
  word         "answer in one word": passes when the reply is one word and an accepted answer
  french       "reply in French": passes when the reply holds an accepted French word
  list         "list three ...": passes when the reply names at least three different accepted items
replay.jsonl: general prompts (no answers), disjoint from retention.jsonl, that the replay stage answers with the
base model itself (self-distillation) and mixes into the task's training data.
Written by this project, Apache-2.0. No randomness: reruns give identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "general"

# country -> capital: the first 12 are scored, the rest only replayed
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("England", "London"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("China", "Beijing"),
            ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"),
            ("Norway", "Oslo"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Sweden", "Stockholm"),
            ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Thailand", "Bangkok"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Cuba", "Havana")]
N_SCORED_CAPITALS = 12
# everyday facts: question, accepted answers, and a one-line reference (drift is measured on it)
FACTS = [
    ("What color is the sky on a clear day?", ["blue"], "The sky is blue."),
    ("What is the largest planet in our solar system?", ["Jupiter"], "Jupiter is the largest planet."),
    ("What gas do plants take in from the air to make food?", ["carbon dioxide", "CO2"], "Carbon dioxide."),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"], "Water freezes at 0 degrees Celsius."),
    ("Which animal is known as the king of the jungle?", ["lion"], "The lion."),
    ("What do bees make?", ["honey"], "Bees make honey."),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"], "William Shakespeare."),
    ("What is the chemical symbol for water?", ["H2O"], "H2O."),
    ("How many legs does a spider have?", ["8", "eight"], "A spider has eight legs."),
    ("What is the opposite of hot?", ["cold"], "Cold."),
]
# question -> the number (arithmetic, units, dates)
NUMBERS = [
    ("What is 2 + 3?", 5), ("What is 7 + 5?", 12), ("What is 10 - 4?", 6), ("What is 3 times 4?", 12),
    ("What is 20 divided by 5?", 4), ("What is 9 + 10?", 19), ("What is 6 times 7?", 42), ("What is 100 - 1?", 99),
    ("How many days are in a week?", 7), ("How many minutes are in an hour?", 60),
    ("How many hours are in a day?", 24), ("How many months are in a year?", 12),
    ("How many centimeters are in a meter?", 100), ("How many seconds are in a minute?", 60),
    ("How many days are in a leap year?", 366), ("How many grams are in a kilogram?", 1000),
]
WORD_QUESTIONS = [
    ("What month comes after March?", ["April"]), ("What day comes after Monday?", ["Tuesday"]),
    ("What is the color of grass?", ["green"]),
]
FRENCH = [
    ("Reply in French: say thank you.", ["merci"]), ("Reply in French: say hello.", ["bonjour", "salut"]),
    ("Reply in French: how do you say 'cat'?", ["chat"]),
]
LISTS = [
    ("colors", ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown", "gray",
                "grey", "violet", "indigo"]),
    ("fruits", ["apple", "banana", "orange", "grape", "mango", "pear", "strawberry", "cherry", "peach", "lemon",
                "pineapple", "watermelon", "kiwi", "plum", "apricot", "blueberry", "lime", "melon", "grapes"]),
    ("animals", ["dog", "cat", "lion", "tiger", "elephant", "horse", "cow", "bird", "fish", "bear", "monkey",
                 "rabbit", "giraffe", "zebra", "wolf", "fox", "deer", "mouse", "sheep", "goat", "pig", "dolphin",
                 "whale", "penguin", "eagle", "snake", "chicken", "duck", "owl", "kangaroo"]),
    ("days of the week", ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]),
]

# replay prompts: general requests of many kinds, none of them a retention question
TOPICS = ["the ocean", "a rainy day", "friendship", "the moon", "a small garden", "autumn", "trains", "music",
          "breakfast", "mountains", "a library", "the city at night", "winter", "a good teacher", "the desert",
          "a birthday party"]
THINGS = ["a computer", "a bicycle", "photosynthesis", "a volcano", "gravity", "a rainbow", "a calendar",
          "an umbrella", "a thermometer", "electricity", "a map", "a battery", "the internet", "a telescope",
          "a vaccine", "recycling", "a compass", "democracy", "a museum", "an airplane"]
TIPS = ["sleeping better", "studying for an exam", "saving money", "staying healthy", "learning a language",
        "cooking rice", "keeping a plant alive", "writing an email", "running a first race", "staying focused"]
WORDS_ES = ["house", "book", "dog", "friend", "sun", "tree", "bread", "school"]
SUMS = [(4, 4), (8, 5), (12, 3), (15, 6), (30, 12), (7, 9), (11, 11), (25, 25)]


def retention_items() -> list[dict]:
    items = []
    for country, capital in CAPITALS[:N_SCORED_CAPITALS]:
        items.append({"kind": "fact", "prompt": f"What is the capital of {country}?", "answers": [capital],
                      "reference": f"The capital of {country} is {capital}."})
    for q, answers, ref in FACTS:
        items.append({"kind": "fact", "prompt": q, "answers": answers, "reference": ref})
    for q, n in NUMBERS:
        items.append({"kind": "number", "prompt": q, "answers": [str(n)], "reference": f"{n}."})
    for q, answers in WORD_QUESTIONS:
        items.append({"kind": "word", "prompt": f"Answer in one word: {q}", "answers": answers,
                      "reference": answers[0]})
    for q, answers in FRENCH:
        items.append({"kind": "french", "prompt": q, "answers": answers, "reference": answers[0].capitalize() + "."})
    for what, vocab in LISTS:
        items.append({"kind": "list", "prompt": f"List three {what}.", "answers": vocab,
                      "reference": ", ".join(v.capitalize() for v in vocab[:3]) + "."})
    return [{"id": f"r{i:02d}", **it} for i, it in enumerate(items)]


def replay_prompts() -> list[dict]:
    ps = [f"Write one sentence about {t}." for t in TOPICS]
    ps += [f"Explain what {t} is in one or two sentences." for t in THINGS]
    ps += [f"Give me one tip for {t}." for t in TIPS]
    ps += [f"What is the capital of {c}?" for c, _ in CAPITALS[N_SCORED_CAPITALS:]]
    ps += [f"What is {a} plus {b}?" for a, b in SUMS]
    ps += [f"How do you say '{w}' in Spanish?" for w in WORDS_ES]
    ps += ["Name two planets.", "Name two musical instruments.", "Name two vegetables.", "Name two sports.",
           "What is a good name for a cat?", "Tell me a fun fact about elephants.", "Tell me a fun fact about space.",
           "What should I pack for a beach trip?", "How are you today?", "Who are you?",
           "Summarize the story of Cinderella in one sentence.", "What is the difference between a lake and a sea?",
           "Why do we need sleep?", "What is a healthy breakfast?", "Suggest a name for a bakery.",
           "Describe the color red to someone.", "What happens when water boils?", "Why is the sea salty?"]
    return [{"id": f"p{i:03d}", "prompt": p} for i, p in enumerate(ps)]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    retention, replay = retention_items(), replay_prompts()
    assert not {r["prompt"] for r in retention} & {p["prompt"] for p in replay}, "replay overlaps the retention set"
    for name, rows in (("retention.jsonl", retention), ("replay.jsonl", replay)):
        (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{OUT / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
