"""Writes smollm2_prefs.jsonl, the preference pairs of the smollm2-135m recipe (run once; the output is committed).

    .venv/bin/python recipes/data/make_smollm2_data.py

The preference taught: answer in one sentence, then stop. SmolLM2-135M-Instruct does not: asked "Tell me about
bees." it writes a paragraph that runs past 100 tokens and often repeats itself. Each pair is a question about
one of the TOPICS below, and two replies of the model itself (greedy, as the recipe's base: .cache/smollm2-135m,
float32 on the CPU): the rejected one is its reply, cut after its last complete sentence within
REJECTED_TOKENS; the chosen one is the same reply stopped after its first sentence (after its second when the
first is under MIN_WORDS words). Both sides are the model's own words, so the pair differs where a reply
should end: DPO learns to stop, not new facts, and the model's style is kept (written answers as the chosen
side made SmolLM2 loop on short sentences: measured, see BENCHMARKS.md). The recipe's probes ask about topics
that are not here, so they show whether the preference generalises.
"""
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "smollm2_prefs.jsonl"
REJECTED_TOKENS = 80
MIN_WORDS = 8
ASKS = ["What is {t}?", "Tell me about {t}.", "Can you explain {t}?", "Describe {t}.", "What should I know about {t}?",
        "Give me a quick overview of {t}."]

# what the questions ask about (the probes' topics, volcanoes, penguins and rainbows, are left out)
TOPICS = [
    'the moon', 'photosynthesis', 'gravity', 'the internet', 'black holes', 'DNA', 'the heart', 'vaccines',
    'electricity', 'the Roman Empire', 'climate change', 'the stock market', 'coffee', 'tea', 'chess', 'the piano',
    'the Eiffel Tower', 'the Great Wall of China', 'the Amazon rainforest', 'the Sahara', 'Mount Everest',
    'the Pacific Ocean', 'earthquakes', 'tsunamis', 'hurricanes', 'lightning', 'the water cycle', 'atoms',
    'the periodic table', 'oxygen', 'carbon dioxide', 'the immune system', 'sleep', 'exercise', 'meditation',
    'the brain', 'bacteria', 'viruses', 'antibiotics', 'the solar system', 'Mars', 'Jupiter', 'Saturn', 'comets',
    'the Milky Way', 'telescopes', 'computers', 'programming', 'Python', 'artificial intelligence',
    'machine learning', 'passwords', 'email', 'smartphones', 'batteries', 'solar panels', 'wind turbines',
    'nuclear power', 'recycling', 'bread', 'cheese', 'chocolate', 'rice', 'olive oil', 'the Olympic Games',
    'football', 'basketball', 'tennis', 'yoga', 'Shakespeare', 'Mozart', 'the Mona Lisa', 'democracy', 'inflation',
    'interest rates', 'taxes', 'the United Nations', 'the French Revolution', 'the printing press', 'the wheel',
    'airplanes', 'trains', 'bicycles', 'electric cars', 'dogs', 'cats', 'whales', 'sharks', 'elephants',
    'butterflies', 'ants', 'trees', 'coral reefs', 'dinosaurs', 'the Moon landing',
    'the International Space Station', 'glaciers', 'the ozone layer', 'money', 'libraries', 'maps',
]


def sentences(text: str) -> list[str]:
    """Complete sentences (ending in . ! or ?), in order; an unfinished tail is dropped."""
    return [m.group(0).strip() for m in re.finditer(r".+?[.!?](?=\s|$)", text, re.S)]


def pair(question: str, reply: str) -> dict | None:
    """(prompt, chosen, rejected), or None when the reply has too few sentences to shorten."""
    said = sentences(reply)
    if not said:
        return None
    first = 1 if len(said[0].split()) >= MIN_WORDS else 2 if len(said) > 1 else 1
    if len(said) <= first:
        return None
    return {"prompt": question, "chosen": " ".join(said[:first]), "rejected": " ".join(said)}


def main():
    import sys

    import torch

    sys.path.insert(0, str(HERE.parent.parent))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.smollm2 import ensure_model

    folder = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = random.Random(0)
    questions = []
    for topic in TOPICS:
        for ask in rng.sample(ASKS, 3):
            question = ask.format(t=topic)
            questions.append(question[0].upper() + question[1:])
    rows = []
    for start in range(0, len(questions), 20):
        batch = questions[start:start + 20]
        inputs = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q in batch], padding=True,
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=REJECTED_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for question, ids in zip(batch, out[:, inputs["input_ids"].shape[1]:]):
            row = pair(question, tokenizer.decode(ids, skip_special_tokens=True))
            if row:
                rows.append(row)
        print(f"{start + len(batch)}/{len(questions)} questions, {len(rows)} pairs")
    rng.shuffle(rows)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} pairs in {OUT}")


if __name__ == "__main__":
    main()
