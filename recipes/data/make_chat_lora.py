"""Generate the chat-lora dataset: booking requests in free English -> one strict line of JSON.

    python recipes/data/make_chat_lora.py        # rewrites recipes/data/chat-lora/{train,eval}.jsonl

The base model cannot do this reliably (it chats, adds prose, or gets the date format wrong); a short LoRA run can.
The task is non-trivial: quantities come as digits or words, dates as "14 March", "March 14th" or "the 14th of
March" and must become MM-DD, field order in the request varies, and some conversations have a second turn that
changes one field. The eval split uses names, surnames and cities that never occur in train, and two request
phrasings held out of train, so a good score is not a template copy. Seeded: reruns give identical files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = 'Extract the booking as one line of JSON with keys "name", "city", "qty", "date" (MM-DD). No other text.'
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
         10: "ten", 11: "eleven", 12: "twelve"}
FIRST = ["Priya", "Tomas", "Aiko", "Liam", "Fatima", "Oskar", "Mei", "Diego", "Amara", "Jonas", "Sofia", "Kwame",
         "Elena", "Ravi", "Noor", "Hugo", "Ingrid", "Mateo", "Yuki", "Chloe", "Arjun", "Leila", "Bruno", "Hana",
         "Emeka", "Astrid", "Pablo", "Zara", "Nikolai", "Ines", "Omar", "Greta", "Kenji", "Lucia", "Tariq", "Freya"]
LAST = ["Natarajan", "Novak", "Tanaka", "Murphy", "Haddad", "Lindqvist", "Chen", "Alvarez", "Okafor", "Becker",
        "Rossi", "Mensah", "Popescu", "Iyer", "Farouk", "Dubois", "Berg", "Castillo", "Sato", "Martin", "Kapoor",
        "Rahimi", "Costa", "Kim", "Eze", "Holm", "Ortega", "Malik", "Volkov", "Ferreira", "Aziz", "Weber"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Dublin", "Cairo", "Porto", "Seoul", "Lima", "Accra", "Munich", "Naples",
          "Nairobi", "Krakow", "Chennai", "Tunis", "Lyon", "Bergen", "Quito", "Osaka", "Madrid", "Pune", "Tabriz",
          "Recife", "Busan", "Lagos", "Malmo", "Bogota", "Karachi", "Kazan", "Braga", "Rabat", "Hamburg"]
TEMPLATES = [
    "Hi, this is {name}. I'd like {qty} tickets for the {city} show on {date}, please.",
    "Book {qty} seats in {city} for {date}. The name is {name}.",
    "{name} here - can you reserve {qty} places for {date} in {city}?",
    "Please put {name} down for {qty} tickets, {city}, {date}.",
    "I need {qty} tickets to {city} on {date}. Booking under {name}.",
    "Could I get {qty} for the {date} event in {city}? My name's {name}.",
    "Reservation for {name}: {city}, {date}, {qty} people.",
    "Hello! {qty} tickets for {city}, {date}, for {name} please.",
    # held out of train:
    "For {date}, {name} wants {qty} tickets in {city}.",
    "Name: {name}. Destination: {city}. Tickets: {qty}. Day: {date}.",
]
TRAIN_TEMPLATES, EVAL_TEMPLATES = TEMPLATES[:8], TEMPLATES
CHANGES = [
    ("qty", "Actually, make that {v} tickets."),
    ("date", "Sorry, can we move it to {v}?"),
    ("city", "Change of plan: {v} instead."),
]


def spoken_date(rng: random.Random, month: int, day: int) -> str:
    m = MONTHS[month - 1]
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return rng.choice([f"{day} {m}", f"{m} {day}{suffix}", f"the {day}{suffix} of {m}"])


def spoken_qty(rng: random.Random, qty: int) -> str:
    return WORDS[qty] if rng.random() < 0.4 else str(qty)


def answer(b: dict) -> str:
    return json.dumps({"name": b["name"], "city": b["city"], "qty": b["qty"], "date": b["date"]})


def example(rng: random.Random, first, last, cities, templates) -> dict:
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    b = {"name": f"{rng.choice(first)} {rng.choice(last)}", "city": rng.choice(cities), "qty": rng.randint(1, 12),
         "date": f"{month:02d}-{day:02d}"}
    user = rng.choice(templates).format(name=b["name"], city=b["city"], qty=spoken_qty(rng, b["qty"]),
                                        date=spoken_date(rng, month, day))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer(b)}]
    if rng.random() < 0.25:  # a second turn that changes one field
        key, text = rng.choice(CHANGES)
        if key == "qty":
            b["qty"] = rng.choice([q for q in range(1, 13) if q != b["qty"]])
            said = spoken_qty(rng, b["qty"])
        elif key == "date":
            month, day = rng.randint(1, 12), rng.randint(1, 28)
            b["date"], said = f"{month:02d}-{day:02d}", spoken_date(rng, month, day)
        else:
            b["city"] = said = rng.choice([c for c in cities if c != b["city"]])
        messages += [{"role": "user", "content": text.format(v=said)}, {"role": "assistant", "content": answer(b)}]
    return {"messages": messages}


def main(n_train: int = 640, n_eval: int = 64, seed: int = 0) -> None:
    rng = random.Random(seed)
    split = lambda xs: (xs[: len(xs) * 3 // 4], xs[len(xs) * 3 // 4:])  # noqa: E731
    (f_tr, f_ev), (l_tr, l_ev), (c_tr, c_ev) = split(FIRST), split(LAST), split(CITIES)
    out = Path(__file__).parent / "chat-lora"
    out.mkdir(exist_ok=True)
    rows = {"train": [example(rng, f_tr, l_tr, c_tr, TRAIN_TEMPLATES) for _ in range(n_train)],
            "eval": [example(rng, f_ev, l_ev, c_ev, EVAL_TEMPLATES) for _ in range(n_eval)]}
    for name, xs in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in xs))


if __name__ == "__main__":
    main()
