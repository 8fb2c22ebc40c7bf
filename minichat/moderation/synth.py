"""Project-generated training examples: chat-style requests for the categories the tweet/hate data lacks,
and benign look-alikes ("kill the process", "shoot a portrait") as negatives. Written for this project.

The bench's safe look-alike prompts (bench/moderation/safe_lookalikes.txt) are a separate, hand-written set;
these templates never read them.
"""
from __future__ import annotations

import random

from minichat.moderation import synth_chat, synth_frames
from minichat.moderation.categories import CATEGORIES, PARENT

OPENERS = ["how do i", "how can i", "how to", "what is the best way to", "whats the easiest way to", "help me",
           "teach me how to", "i want to", "tell me how to", "give me tips to", "explain how to", "steps to",
           "how would someone", "i need to", "what are ways to"]
PEOPLE = ["my classmate", "the new kid", "my coworker", "sarah", "my sister", "the fat kid at school", "my neighbor",
          "that girl", "him", "my ex", "my boss", "a stranger", "my roommate", "james", "my stepdad", "her", "them",
          "my teacher", "the guy next door", "my wife", "my husband", "a kid in my class", "my cousin", "maria"]


def _fill(templates: list[str], slots: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    out = set()
    for _ in range(n * 3):
        t = rng.choice(templates)
        for k, vals in slots.items():
            while "{" + k + "}" in t:
                t = t.replace("{" + k + "}", rng.choice(vals), 1)
        out.add(t)
        if len(out) >= n:
            break
    return sorted(out)


def examples(seed: int = 0) -> list[tuple[str, set[str]]]:
    """(text, positive categories); an empty set is a benign example (every category 0)."""
    rng = random.Random(seed)
    S = {"open": OPENERS, "person": PEOPLE}
    pos: list[tuple[list[str], dict, set[str], int]] = [
        (["{open} {hv} {person}", "{open} {hv} {person} online", "{open} {hv} {person} without getting caught",
          "{open} {hv} {person} until they cry"],
         {"hv": ["bully", "harass", "humiliate", "torment", "make fun of", "intimidate", "cyberbully",
                 "spread rumors about", "stalk", "dox", "ruin the life of", "get revenge on", "pick on", "mock"]},
         {"harassment"}, 400),
        (["you are a {adj} {ins}", "you {adj} {ins}", "shut up you {ins}", "nobody likes you, you {ins}",
          "youre such a {ins}", "go away you {adj} {ins}", "everyone thinks youre a {ins}"],
         {"adj": ["stupid", "worthless", "ugly", "pathetic", "disgusting", "fat", "useless", "dumb"],
          "ins": ["idiot", "loser", "moron", "freak", "bitch", "piece of trash", "failure", "clown", "waste of space"]},
         {"harassment"}, 300),
        (["im going to {vv} you", "i will find you and {vv} you", "ill {vv} you if you say that again",
          "you better watch out, im gonna {vv} you", "i know where you live and im going to {vv} you",
          "we will {vv} your whole family"],
         {"vv": ["kill", "hurt", "stab", "shoot", "beat", "strangle", "break", "burn"]},
         {"harassment/threatening", "violence"}, 250),
        (["{open} {vv} {person}", "{open} {vv} {person} and hide the body", "{open} {vv} {person} without leaving evidence",
          "{open} {vv} {person} and make it look like an accident"],
         {"vv": ["kill", "murder", "poison", "strangle", "stab", "shoot", "beat up", "hurt", "kidnap", "torture",
                 "drown", "run over", "suffocate"]},
         {"violence"}, 500),
        (["describe in gory detail how his {body} was {gr}", "write a scene where the victims {body} is {gr} and blood sprays everywhere",
          "the {body} was {gr} and the floor was covered in blood and guts", "show me graphic pictures of {body} being {gr}"],
         {"body": ["skull", "stomach", "face", "arm", "chest", "throat", "leg"],
          "gr": ["ripped open", "crushed", "torn apart", "split open", "cut off", "smashed to pulp", "sliced open"]},
         {"violence/graphic", "violence"}, 200),
        (["i want to {sh}", "im going to {sh} tonight", "i cant take it anymore, im going to {sh}", "i think i will {sh} soon",
          "i have decided to {sh}", "nobody would care if i {sh2}", "i wrote a note because im going to {sh}"],
         {"sh": ["kill myself", "end my life", "end it all", "cut myself again", "take all my pills", "hang myself",
                 "jump off the bridge", "die"],
          "sh2": ["died", "killed myself", "disappeared forever"]},
         {"self-harm/intent", "self-harm"}, 250),
        (["what is the {adj} way to {sh}", "how many {pills} do i need to take to die", "{open} {sh} without anyone noticing",
          "which {pills} are best for overdosing", "how deep do i need to cut to {sh}"],
         {"adj": ["easiest", "most painless", "quickest", "surest", "least painful"],
          "sh": ["kill myself", "die", "commit suicide", "end my life", "cut myself", "overdose"],
          "pills": ["sleeping pills", "tylenol pills", "painkillers", "antidepressants", "pills"]},
         {"self-harm/instructions", "self-harm"}, 250),
        (["write an {ex} story about {ad}", "describe {act} in explicit detail", "send me {nude}",
          "roleplay as my {role} and talk dirty to me", "write {ex} fanfic where {ad} {act2}"],
         {"ex": ["erotic", "explicit", "steamy sex", "nsfw", "pornographic", "smutty"],
          "ad": ["two coworkers", "a couple on their honeymoon", "my neighbor and me", "two adults", "a nurse and a doctor"],
          "act": ["oral sex", "them having sex", "a threesome", "masturbation", "their orgasm"],
          "act2": ["have sex", "hook up in the shower", "sleep together"],
          "nude": ["nudes", "naked pics", "your tits", "a dick pic"],
          "role": ["girlfriend", "lover", "mistress"]},
         {"sexual"}, 300),
        (["write a sexual story about a {mn}", "{mn} nude photos", "describe a {mn} in a sexy way",
          "where can i find sexual pictures of {mn}s"],
         {"mn": ["12 year old", "child", "young girl", "little boy", "minor", "preteen", "underage girl"]},
         {"sexual/minors", "sexual"}, 80),
        (["{open} {il}", "{open} {il} without getting caught", "give me step by step instructions to {il}"],
         {"il": ["make meth at home", "cook crystal meth", "buy cocaine online", "launder money", "hack into my exs email",
                 "steal a car", "shoplift from walmart", "make counterfeit money", "get a fake id", "steal credit card numbers",
                 "break into a house", "sell drugs at school", "write ransomware", "create a phishing page",
                 "commit insurance fraud", "evade taxes", "hack my neighbors wifi", "smuggle drugs through customs",
                 "pick a lock to break into my neighbors house", "scam old people"]},
         {"illicit"}, 500),
        (["{open} {iv}", "{open} {iv} at home", "give me a recipe for {iv2}"],
         {"iv": ["make a pipe bomb", "build a bomb", "make a molotov cocktail", "3d print a ghost gun", "make ricin",
                 "build an explosive device", "make napalm", "buy an untraceable gun", "make poison to kill someone",
                 "hire a hitman", "make a silencer for my gun"],
          "iv2": ["a bomb", "explosives", "nerve gas", "thermite to hurt people"]},
         {"illicit/violent", "illicit", "violence"}, 300),
    ]
    benign_sets: list[tuple[list[str], dict, int]] = [
        (["{open} kill {proc}", "why wont my {proc} die", "{open} kill all {proc}es", "i accidentally killed {proc}"],
         {"proc": ["the process", "a background job", "a docker container", "the node server", "a stuck thread",
                   "the java process", "the tmux session", "a kubernetes pod", "the worker"]}, 200),
        (["{open} shoot {ph}", "tips for shooting {ph}", "what lens should i use to shoot {ph}"],
         {"ph": ["portraits", "a wedding", "landscapes", "video in 4k", "product photos", "the milky way",
                 "sports photos", "a music video"]}, 150),
        (["{open} kill {pest}", "what kills {pest} naturally", "{open} get rid of {pest}"],
         {"pest": ["weeds", "fruit flies", "mold in the bathroom", "aphids on roses", "bed bugs", "ants in the kitchen"]}, 120),
        (["{open} beat {game}", "{open} kill {boss} in {gm}", "tips to destroy my opponent in {gm}"],
         {"game": ["the final boss", "level 5", "my high score", "the traffic"], "boss": ["the dragon", "the boss"],
          "gm": ["elden ring", "chess", "minecraft", "zelda"]}, 120),
        (["what are the symptoms of {med}", "how is {med} treated", "first aid for {med}",
          "what should i do if my {pet} ate {food}"],
         {"med": ["a heart attack", "a stroke", "food poisoning", "an opioid overdose", "a panic attack", "a deep cut",
                  "carbon monoxide poisoning", "a concussion"],
          "pet": ["dog", "cat", "toddler"], "food": ["chocolate", "grapes", "a battery", "ibuprofen"]}, 150),
        (["how can i help a friend who {sh}", "what are the warning signs of {sht}", "how do suicide hotlines work",
          "how do i support my {rel} who is being {ab}"],
         {"sh": ["talks about suicide", "self harms", "is suicidal", "is cutting herself"],
          "sht": ["suicide", "self harm", "depression", "an eating disorder"],
          "rel": ["son", "daughter", "friend", "student"], "ab": ["bullied", "harassed online", "abused"]}, 120),
        (["what was the history of {hist}", "why did {hist} happen", "explain the causes of {hist}",
          "write an essay about {hist}"],
         {"hist": ["the holocaust", "the rwandan genocide", "world war two", "the atomic bombing of hiroshima",
                   "slavery in america", "the civil rights movement", "apartheid"]}, 120),
        (["how do i protect my {acct} from {thr}", "what is {thr} and how do i avoid it", "how do i recover my {acct}"],
         {"acct": ["instagram account", "email", "phone", "bank account", "wifi network"],
          "thr": ["hackers", "phishing", "identity theft", "ransomware", "scammers"]}, 120),
        (["how do i talk to my {kid} about {topic}", "at what age should kids learn about {topic}",
          "what is good {sexed} for teenagers"],
         {"kid": ["son", "daughter", "kids", "10 year old", "teenager"],
          "topic": ["puberty", "consent", "body safety", "where babies come from", "online predators"],
          "sexed": ["sex education", "sexual health education"]}, 100),
        (["what a killer {x}", "this {y} is killing it", "i could kill for {z}", "that joke killed me", "im dying to {w}"],
         {"x": ["app", "deal", "workout", "view", "outfit"], "y": ["band", "team", "startup", "chef"],
          "z": ["a coffee", "a pizza", "some sleep"], "w": ["see that movie", "try that restaurant", "know"]}, 100),
        (["{open} {neutral}", "can you {neutral2}", "please {neutral2}"],
         {"neutral": ["bake sourdough bread", "learn python", "fix a leaky faucet", "train for a marathon",
                      "write a cover letter", "make friends in a new city", "negotiate a raise", "grow tomatoes",
                      "cook a steak", "study for exams", "deal with a difficult coworker", "apologize to a friend",
                      "sharpen a kitchen knife", "cut onions without crying", "shoot a basketball"],
          "neutral2": ["write a poem about the sea", "explain quantum computing", "summarize this article",
                       "translate this into french", "tell me a joke", "recommend a good book",
                       "write a murder mystery plot", "explain how vaccines kill viruses", "help me plan a trip to japan",
                       "write a story about a brave knight who slays a dragon"]}, 400),
    ]
    out: list[tuple[str, set[str]]] = []
    for templates, slots, cats, n in pos:
        cats = set(cats) | {PARENT[c] for c in cats if c in PARENT}
        for t in _fill(templates, {**S, **slots}, n, rng):
            out.append((t, cats))
    for templates, slots, n in benign_sets:
        for t in _fill(templates, {**S, **slots}, n, rng):
            out.append((t, set()))
    return out + synth_frames.examples(seed) + synth_chat.examples(seed)


def labelled(seed: int = 0) -> list[tuple[str, dict[str, int]]]:
    """(text, {category: 0/1}); a head trains only on the texts whose labels name its category."""
    rows = [(t, {c: int(c in cats) for c in CATEGORIES}) for t, cats in examples(seed)]
    # the harassment heads learned from tweets that text addressing "you" is offensive; an assistant's answers
    # address "you" throughout and were flagged the longer they were
    rows += [(t, {c: 0 for c in HARASSMENT}) for t in synth_chat.answers(seed)]
    # self-harm made beautiful, and recovery in the same words, for the self-harm heads only (synth_frames)
    harmful, benign = synth_frames.self_harm_glorified(seed)
    rows += [(t, {c: int(c == "self-harm") for c in SELF_HARM}) for t in harmful]
    return rows + [(t, {c: 0 for c in SELF_HARM}) for t in benign]


HARASSMENT = ("harassment", "harassment/threatening")
SELF_HARM = ("self-harm", "self-harm/intent", "self-harm/instructions")

