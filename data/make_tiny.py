"""Generate the embedded tiny dataset in data/tiny/ (deterministic; committed to git).

The text is synthetic English from a small procedural grammar (a few hundred words), so it carries
no licence restrictions and stays small. It has structure a tiny model can learn at several ranges:
subject-verb agreement and irregular past tenses (local), a per-document topic that selects the
nouns and verbs (document level), a protagonist whose name and pronoun recur through the document
(coreference), weekday sequences, and simple counting stories whose final number is the difference
of two earlier ones (arithmetic).

Outputs, all in --out (default data/tiny):
  tokenizer.model              SentencePiece BPE, vocab 512, pad=0 bos=1 eos=2 unk=3, no byte
                               fallback, split digits, no dummy prefix, nmt_nfkc (as the official
                               fineweb_1024_bpe.model). Trained on all generated documents.
  fineweb_val_000000.bin       first documents, >= --val-tokens tokens (never a multiple of 128, so
                               evaluation code must handle a ragged tail)
  fineweb_train_000000.bin     following documents, at most --train-tokens tokens

Run: python data/make_tiny.py            (rewrites data/tiny/ byte-identically)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_text import write_shards  # noqa: E402

# ----------------------------------------------------------------------------- word lists

NAMES_SHE = ["Anna", "Mara", "Lucy", "Nora", "Ella", "Rosa", "Ivy", "Clara", "Ada", "Maya", "Lena", "Tess"]
NAMES_HE = ["Tom", "Ben", "Sam", "Leo", "Max", "Hugo", "Finn", "Oscar", "Jack", "Noah", "Felix", "Owen"]

# Each topic: place, things found there (singular, plural), actions (base, 3rd person, past)
# and adjectives that fit it. The topic of a document decides which words appear.
TOPICS = {
    "farm": dict(
        place="farm",
        nouns=[("cow", "cows"), ("goat", "goats"), ("hen", "hens"), ("horse", "horses"), ("barn", "barns"),
               ("field", "fields"), ("fence", "fences"), ("egg", "eggs"), ("pig", "pigs"), ("tractor", "tractors")],
        verbs=[("feed", "feeds", "fed"), ("count", "counts", "counted"), ("wash", "washes", "washed"),
               ("paint", "paints", "painted"), ("follow", "follows", "followed"), ("find", "finds", "found")],
        adjs=["muddy", "quiet", "brown", "old", "hungry", "sleepy"],
    ),
    "harbor": dict(
        place="harbor",
        nouns=[("boat", "boats"), ("net", "nets"), ("fish", "fish"), ("rope", "ropes"), ("gull", "gulls"),
               ("ship", "ships"), ("wave", "waves"), ("crab", "crabs"), ("sail", "sails"), ("dock", "docks")],
        verbs=[("pull", "pulls", "pulled"), ("mend", "mends", "mended"), ("catch", "catches", "caught"),
               ("watch", "watches", "watched"), ("tie", "ties", "tied"), ("carry", "carries", "carried")],
        adjs=["salty", "wet", "blue", "windy", "long", "heavy"],
    ),
    "forest": dict(
        place="forest",
        nouns=[("tree", "trees"), ("fox", "foxes"), ("owl", "owls"), ("path", "paths"), ("leaf", "leaves"),
               ("stone", "stones"), ("river", "rivers"), ("deer", "deer"), ("berry", "berries"), ("log", "logs")],
        verbs=[("climb", "climbs", "climbed"), ("see", "sees", "saw"), ("hear", "hears", "heard"),
               ("gather", "gathers", "gathered"), ("cross", "crosses", "crossed"), ("find", "finds", "found")],
        adjs=["dark", "green", "tall", "quiet", "wild", "cold"],
    ),
    "city": dict(
        place="city",
        nouns=[("street", "streets"), ("bus", "buses"), ("shop", "shops"), ("bridge", "bridges"),
               ("tower", "towers"), ("car", "cars"), ("train", "trains"), ("park", "parks"),
               ("light", "lights"), ("map", "maps")],
        verbs=[("visit", "visits", "visited"), ("pass", "passes", "passed"), ("take", "takes", "took"),
               ("watch", "watches", "watched"), ("build", "builds", "built"), ("see", "sees", "saw")],
        adjs=["busy", "bright", "noisy", "new", "tall", "crowded"],
    ),
    "school": dict(
        place="school",
        nouns=[("book", "books"), ("desk", "desks"), ("pencil", "pencils"), ("lesson", "lessons"),
               ("teacher", "teachers"), ("letter", "letters"), ("chair", "chairs"), ("song", "songs"),
               ("picture", "pictures"), ("window", "windows")],
        verbs=[("read", "reads", "read"), ("write", "writes", "wrote"), ("draw", "draws", "drew"),
               ("learn", "learns", "learned"), ("open", "opens", "opened"), ("sing", "sings", "sang")],
        adjs=["clean", "small", "yellow", "easy", "long", "happy"],
    ),
    "kitchen": dict(
        place="kitchen",
        nouns=[("cup", "cups"), ("bowl", "bowls"), ("apple", "apples"), ("cake", "cakes"), ("spoon", "spoons"),
               ("pot", "pots"), ("bread", "breads"), ("plate", "plates"), ("lemon", "lemons"), ("pie", "pies")],
        verbs=[("cook", "cooks", "cooked"), ("cut", "cuts", "cut"), ("bake", "bakes", "baked"),
               ("wash", "washes", "washed"), ("eat", "eats", "ate"), ("make", "makes", "made")],
        adjs=["warm", "sweet", "red", "fresh", "hot", "round"],
    ),
    "mountain": dict(
        place="mountain",
        nouns=[("rock", "rocks"), ("goat", "goats"), ("cloud", "clouds"), ("tent", "tents"), ("lake", "lakes"),
               ("peak", "peaks"), ("bird", "birds"), ("cave", "caves"), ("flower", "flowers"), ("trail", "trails")],
        verbs=[("climb", "climbs", "climbed"), ("reach", "reaches", "reached"), ("carry", "carries", "carried"),
               ("see", "sees", "saw"), ("find", "finds", "found"), ("draw", "draws", "drew")],
        adjs=["high", "steep", "white", "cold", "quiet", "grey"],
    ),
    "market": dict(
        place="market",
        nouns=[("basket", "baskets"), ("coin", "coins"), ("pear", "pears"), ("hat", "hats"), ("carpet", "carpets"),
               ("lamp", "lamps"), ("box", "boxes"), ("cheese", "cheeses"), ("jar", "jars"), ("shoe", "shoes")],
        verbs=[("buy", "buys", "bought"), ("sell", "sells", "sold"), ("count", "counts", "counted"),
               ("carry", "carries", "carried"), ("choose", "chooses", "chose"), ("find", "finds", "found")],
        adjs=["cheap", "bright", "old", "new", "small", "busy"],
    ),
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["morning", "afternoon", "evening"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "warm", "cold", "foggy"]
FEELINGS = ["happy", "tired", "proud", "surprised", "calm", "glad"]
PREPS = ["near", "behind", "under", "beside", "next to", "in front of"]
ADVERBS = ["slowly", "quickly", "carefully", "quietly", "again", "together"]
COLORS = ["red", "blue", "green", "yellow", "white", "black"]
FRIEND_WORDS = ["friend", "sister", "brother", "cousin", "neighbor"]


# ----------------------------------------------------------------------------- grammar

class Doc:
    """State shared by the sentences of one document: topic, protagonist, friend, weekday."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.topic = TOPICS[rng.choice(sorted(TOPICS))]
        she = rng.random() < 0.5
        self.name = rng.choice(NAMES_SHE if she else NAMES_HE)
        self.subj, self.obj, self.poss = ("she", "her", "her") if she else ("he", "him", "his")
        self.friend = rng.choice([n for n in NAMES_SHE + NAMES_HE if n != self.name])
        self.relation = rng.choice(FRIEND_WORDS)
        self.day = rng.randrange(len(WEEKDAYS))

    # small helpers -----------------------------------------------------------
    def noun(self) -> tuple[str, str]:
        return self.rng.choice(self.topic["nouns"])

    def verb(self) -> tuple[str, str, str]:
        return self.rng.choice(self.topic["verbs"])

    def adj(self) -> str:
        return self.rng.choice(self.topic["adjs"])

    def who(self) -> str:
        # the protagonist is named at first, then often referred to by pronoun
        return self.rng.choice([self.name, self.subj.capitalize()])

    # sentence templates ------------------------------------------------------
    def s_arrive(self) -> str:
        return f"On {WEEKDAYS[self.day]} {self.rng.choice(TIMES)}, {self.name} went to the {self.topic['place']}."

    def s_weather(self) -> str:
        return f"It was a {self.rng.choice(WEATHER)} day at the {self.topic['place']}."

    def s_agree(self) -> str:
        sing, plur = self.noun()
        base, third, _ = self.verb()
        obj = self.noun()[1]
        if self.rng.random() < 0.5:
            return f"The {self.adj()} {sing} {third} the {obj}."
        return f"The {self.adj()} {plur} {base} the {obj}."

    def s_past(self) -> str:
        _, _, past = self.verb()
        return f"{self.who()} {past} the {self.adj()} {self.noun()[0]} {self.rng.choice(ADVERBS)}."

    def s_where(self) -> str:
        a, b = self.noun()[0], self.noun()[0]
        return f"Where is the {a}? The {a} is {self.rng.choice(PREPS)} the {b}."

    def s_list(self) -> str:
        a, b, c = (n[1] for n in self.rng.sample(self.topic["nouns"], 3))
        return f"At the {self.topic['place']} there were {a}, {b} and {c}."

    def s_count(self) -> str:
        total = self.rng.randint(2, 12)
        given = self.rng.randint(1, total - 1)
        left = total - given
        sing, plur = self.noun()
        use_digits = self.rng.random() < 0.3
        num = (lambda n: str(n)) if use_digits else (lambda n: NUMBER_WORDS[n])
        left_noun = sing if left == 1 else plur
        return (f"{self.name} had {num(total)} {plur}. {self.subj.capitalize()} gave {num(given)} to "
                f"{self.poss} {self.relation} {self.friend}. Now {self.subj} has {num(left)} {left_noun}.")

    def s_because(self) -> str:
        _, _, past = self.verb()
        return (f"Because the {self.noun()[0]} was {self.adj()}, {self.name} {past} the "
                f"{self.noun()[0]} with {self.friend}.")

    def s_next_day(self) -> str:
        # weekdays advance in order through the document
        self.day = (self.day + 1) % len(WEEKDAYS)
        return f"The next day was {WEEKDAYS[self.day]}."

    def s_feel(self) -> str:
        return f"{self.who()} felt {self.rng.choice(FEELINGS)}, and {self.friend} smiled at {self.obj}."

    def s_say(self) -> str:
        sing, _ = self.noun()
        color = self.rng.choice(COLORS)
        return f"\"Look at the {color} {sing}!\" said {self.friend}. \"It is {color},\" said {self.name}."

    def title(self) -> str:
        choice = self.rng.randrange(3)
        if choice == 0:
            return f"A Day at the {self.topic['place'].capitalize()}"
        if choice == 1:
            return f"{self.name} and the {self.adj().capitalize()} {self.noun()[0].capitalize()}"
        return f"{self.name} Visits the {self.topic['place'].capitalize()}"

    def paragraph(self, first: bool) -> str:
        body = [self.s_arrive() if first else self.s_next_day()]
        templates = [self.s_weather, self.s_agree, self.s_past, self.s_where, self.s_list, self.s_count,
                     self.s_because, self.s_feel, self.s_say]
        for _ in range(self.rng.randint(3, 6)):
            body.append(self.rng.choice(templates)())
        return " ".join(body)

    def text(self) -> str:
        paras = [self.paragraph(first=(i == 0)) for i in range(self.rng.randint(1, 3))]
        end = ["The end."] if self.rng.random() < 0.3 else []
        return "\n\n".join([self.title()] + paras + end)


def generate_docs(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [Doc(rng).text() for _ in range(n_docs)]


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs: list[str], vocab_size: int) -> bytes:
    """Train a SentencePiece BPE model with the official special ids and options; return its bytes."""
    import sentencepiece as spm

    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=False,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1,  # one thread and no shuffling keep the model byte-identical across runs
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "tiny"), help="output directory")
    p.add_argument("--seed", type=int, default=1234, help="generator seed")
    p.add_argument("--docs", type=int, default=4000, help="documents to generate (must cover both splits)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--val-tokens", type=int, default=40_000, help="minimum validation tokens (incl. BOS)")
    p.add_argument("--train-tokens", type=int, default=300_000, help="maximum training tokens (incl. BOS)")
    return p


def main(argv: list[str] | None = None) -> int:
    import sentencepiece as spm

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = generate_docs(args.docs, args.seed)
    model_path = out / "tokenizer.model"
    model_path.write_bytes(train_tokenizer(docs, args.vocab_size))

    # Choose the validation document count from real token counts: the smallest prefix reaching
    # --val-tokens, extended by a document while the total is a multiple of 128.
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    lengths = [len(ids) + 1 for ids in sp.encode(docs, out_type=int)]  # +1 for BOS
    val_docs, val_tokens = 0, 0
    while val_tokens < args.val_tokens or val_tokens % 128 == 0:
        val_tokens += lengths[val_docs]
        val_docs += 1
    if sum(lengths[val_docs:]) < args.train_tokens:
        print(f"error: --docs {args.docs} gives only {sum(lengths[val_docs:])} train tokens; raise --docs",
              file=sys.stderr)
        return 1

    summary = write_shards(docs, model_path, out, val_docs=val_docs, max_train_tokens=args.train_tokens)
    summary["bytes"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
