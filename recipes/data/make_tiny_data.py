"""Writes the two data files of the embedded `tiny` recipe (run once; the outputs are committed).

    python recipes/data/make_tiny_data.py

tiny_prefs.jsonl  preference pairs: a question, a polite and complete answer (chosen),
                  a curt, dismissive one (rejected). The style gap is deliberate: DPO on a
                  3M-parameter model must visibly move it in a couple of minutes on a CPU.
tiny_corpus.txt   plain English about the same topics plus chat-formatted dialogues whose
                  replies are in BOTH styles (alternating). It trains the SentencePiece tokenizer
                  and the short supervised warm-up, so the base model speaks, ends replies with
                  EOS, and starts out with no preference between the styles. Its questions use
                  other wording than the preference pairs, so held-out pairs are never seen verbatim.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent

# topic, two facts in plain words
TOPICS = [
    ("the sun", "The sun is a star at the center of our solar system.", "It gives the earth light and warmth."),
    ("the moon", "The moon goes around the earth about once a month.", "It shines because it reflects light from the sun."),
    ("rain", "Rain is water that falls from clouds.", "It helps plants grow and fills rivers and lakes."),
    ("snow", "Snow is frozen water that falls from clouds when the air is cold.", "Each snowflake is made of small ice crystals."),
    ("the ocean", "The ocean covers most of the earth.", "Its water is salty and it is home to many fish."),
    ("trees", "Trees are tall plants with a trunk, branches and leaves.", "They make oxygen and give shade."),
    ("bees", "Bees are insects that collect nectar from flowers.", "They make honey and help plants make seeds."),
    ("cats", "Cats are small animals that many people keep as pets.", "They like to sleep a lot and they can see well at night."),
    ("dogs", "Dogs are loyal animals that live with people.", "They can learn to follow commands and they like to play."),
    ("bread", "Bread is made from flour, water and yeast.", "The dough is baked in a hot oven."),
    ("tea", "Tea is a drink made by pouring hot water over dried leaves.", "Many people drink it in the morning."),
    ("coffee", "Coffee is a drink made from roasted beans.", "It has caffeine, which helps people feel awake."),
    ("the heart", "The heart is a muscle that pumps blood through the body.", "It beats about seventy times a minute."),
    ("sleep", "Sleep lets the body and the mind rest.", "Most adults need seven to nine hours each night."),
    ("exercise", "Exercise is moving the body to stay strong and healthy.", "Walking, running and swimming are good kinds of exercise."),
    ("water", "Water is a clear liquid that all living things need.", "It freezes at zero degrees and boils at one hundred degrees."),
    ("fire", "Fire is the light and heat that come from burning.", "It needs fuel, heat and air to keep going."),
    ("the wind", "The wind is air that moves from one place to another.", "It can turn windmills and push sailing boats."),
    ("clouds", "Clouds are made of tiny drops of water in the sky.", "Dark clouds often bring rain."),
    ("rainbows", "A rainbow appears when sunlight passes through drops of rain.", "It shows red, orange, yellow, green, blue and violet."),
    ("mountains", "Mountains are very high hills of rock.", "The air at the top is cold and thin."),
    ("rivers", "A river is water that flows across the land to the sea.", "Many towns were built next to rivers."),
    ("the desert", "A desert is a dry place that gets very little rain.", "Days there can be hot and nights can be cold."),
    ("birds", "Birds are animals with feathers and wings.", "Most birds can fly and they lay eggs."),
    ("fish", "Fish are animals that live in water.", "They breathe through gills and swim with fins."),
    ("books", "Books hold stories and knowledge on printed pages.", "Reading books helps people learn new words."),
    ("music", "Music is sound arranged in a pleasant way.", "People sing and play instruments to make it."),
    ("the piano", "The piano is an instrument with black and white keys.", "Pressing a key makes a small hammer hit a string."),
    ("bicycles", "A bicycle is a machine with two wheels that you ride with your legs.", "It is a cheap and clean way to travel."),
    ("trains", "Trains are long vehicles that run on rails.", "They carry many people and goods between cities."),
    ("the library", "A library is a place where people borrow books for free.", "It is a quiet place to read and study."),
    ("gardens", "A garden is a piece of land where people grow plants.", "Flowers and vegetables need sun, water and good soil."),
    ("apples", "Apples are round fruits that grow on trees.", "They can be red, green or yellow."),
    ("milk", "Milk is a white drink that comes from cows and goats.", "It has calcium, which is good for bones."),
    ("the brain", "The brain is the organ that controls the body.", "It helps us think, feel and remember."),
    ("teeth", "Teeth help us bite and chew food.", "Brushing them twice a day keeps them healthy."),
    ("the stars", "Stars are huge balls of hot gas far away in space.", "At night we see them as small points of light."),
    ("the seasons", "The four seasons are spring, summer, autumn and winter.", "They change because the earth is tilted as it goes around the sun."),
    ("volcanoes", "A volcano is a mountain that can throw out hot melted rock.", "The melted rock is called lava."),
    ("the computer", "A computer is a machine that follows instructions to work with information.", "It can store files, play games and connect to other computers."),
    ("the internet", "The internet links computers all over the world.", "People use it to send messages and find information."),
    ("money", "Money is what people use to buy and sell things.", "It can be coins, paper notes or numbers in a bank."),
    ("maps", "A map is a drawing of a place seen from above.", "It helps people find their way."),
    ("clocks", "A clock is a tool that shows the time.", "It has hands or numbers for hours and minutes."),
    ("soap", "Soap is used with water to wash away dirt and germs.", "Washing hands with soap helps people stay healthy."),
    ("salt", "Salt is a mineral that gives food a salty taste.", "It comes from the sea or from mines."),
    ("chess", "Chess is a game for two players on a board of sixty four squares.", "The goal is to trap the other king."),
    ("football", "Football is a game where two teams try to kick a ball into a goal.", "Each team has eleven players."),
    ("friendship", "Friendship is a kind bond between people who care about each other.", "Good friends listen and help each other."),
    ("kindness", "Kindness means being friendly, generous and caring.", "A small kind act can make someone's day better."),
]

PAIR_QUESTIONS = ["What is {t}?", "Tell me about {t}.", "Can you explain {t}?",
                  "I want to learn about {t}.", "What do you know about {t}?", "Please describe {t}."]
# other wordings than PAIR_QUESTIONS, but enough of them that the warm-up learns to answer the topic
# whatever the wording: then DPO changes the manner, not the content (held-out prompts stay unseen verbatim)
WARMUP_QUESTIONS = ["Say something about {t}.", "Do you know about {t}?", "Talk to me about {t}.",
                    "Explain {t} to me.", "What can you tell me about {t}?", "Describe {t}, please.",
                    "I have a question about {t}.", "Could you tell me what {t} is?"]

OPENERS = ["Sure!", "Of course!", "Happy to help!", "Good question!"]
CLOSERS = ["I hope this helps.", "Let me know if you want to know more.", "Thanks for asking."]
RUDE = ["No. Look it up yourself.", "I do not care about {t}. Go away.", "Why would I tell you? Ask someone else.",
        "That is a boring question.", "Figure it out on your own.", "Not my problem."]

TEMPLATE_TURN = "<|user|>\n{q}\n<|assistant|>\n{a}</s>"  # the tiny chat template, rendered (see app/tiny.py)


def polite(rng, t, f1, f2):
    return f"{rng.choice(OPENERS)} {f1} {f2} {rng.choice(CLOSERS)}"


def rude(rng, t):
    return rng.choice(RUDE).format(t=t)


def main():
    rng = random.Random(0)
    pairs = []
    for t, f1, f2 in TOPICS:
        for q in PAIR_QUESTIONS:
            pairs.append({"prompt": q.format(t=t), "chosen": polite(rng, t, f1, f2), "rejected": rude(rng, t)})
    rng.shuffle(pairs)
    with open(HERE / "tiny_prefs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")

    lines = []
    for t, f1, f2 in TOPICS:
        lines += [f1, f2, f"{f1} {f2}"]
    for i, (t, f1, f2) in enumerate(TOPICS * 2):
        for j, q in enumerate(WARMUP_QUESTIONS):
            # alternating styles, and as many curt replies as polite openers (4): the first token is a
            # near-tie, so the base answers some prompts politely and some curtly, and DPO's change shows
            answer = polite(rng, t, f1, f2) if (i + j) % 2 else rng.choice(RUDE[:len(OPENERS)]).format(t=t)
            lines.append(TEMPLATE_TURN.format(q=q.format(t=t), a=answer).replace("\n", "\\n"))
    rng.shuffle(lines)
    (HERE / "tiny_corpus.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(pairs)} pairs, {len(lines)} corpus lines")


if __name__ == "__main__":
    main()
