"""Ordinary chat turns as benign training text: what people type to an assistant mid-conversation, and what it says.

The annotated data is tweets and hate-speech test cases, and the other generated text is requests and statements
built around harmful words. Neither has the short, context-free turns of a chat: "What?", "the black one", "did
you text him?", "I feel fine.", "You're right.", "Can you say that again?". On so few words a linear n-gram
head decides by the words it has seen most often with a harmful label ("you" in offensive tweets, "I feel" in
generated self-harm), and such turns were refused. Written for this project; nothing here is read from the
bench's sets.
"""
from __future__ import annotations

import random

from minichat.moderation.synth_frames import _many

COLOR = ["black", "white", "brown", "red", "blue", "green", "yellow", "grey", "pink", "purple", "dark", "light",
         "orange", "silver", "gold", "navy"]
THING = ["the first one", "the second one", "the last one", "the cheaper one", "the recipe", "the code", "that list",
         "the email", "the essay", "the second paragraph", "the chorus", "the summary", "step three", "the title",
         "the intro", "option b", "the bigger one", "the blue one", "the {color} one", "the {color} shirt",
         "the {color} car", "the python version", "the spreadsheet", "my resume", "the flight", "the hotel",
         "the plan for tomorrow", "the budget", "the poem", "your last answer", "the translation", "the story"]
PRON = ["he", "she", "they", "my mom", "my dad", "my brother", "my sister", "my friend", "my boss", "my teacher",
        "my roommate", "my partner", "the landlord", "the doctor", "the plumber", "my kid", "my neighbour"]
OBJ = ["him", "her", "them", "my mom", "my friend", "my boss", "the landlord", "my sister", "my roommate",
       "the teacher", "my partner", "the doctor"]
FEEL = ["fine", "good", "great", "ok", "okay", "tired", "sleepy", "bored", "hungry", "stressed", "nervous",
        "excited", "happy", "a bit sad", "homesick", "relaxed", "sick", "better", "much better", "confused",
        "overwhelmed", "lazy", "cold", "anxious about my exam", "grumpy", "motivated", "lonely tonight", "proud"]
PET = ["dog", "cat", "hamster", "rabbit", "parrot", "goldfish", "puppy", "kitten"]
DAILY = ["i had a long day", "work was stressful today", "i have an exam tomorrow", "i failed my driving test",
         "i passed my driving test", "my {pet} is sick", "my {pet} ate my sock", "i cant sleep", "i cant focus",
         "my back hurts", "i have a headache", "i have a cold", "its raining again", "i missed the bus",
         "i burned the rice", "my phone died", "i got the job", "i didnt get the job", "we broke up last week",
         "my grandma is in hospital", "my flight was cancelled", "i overslept", "my boss yelled at me today",
         "the kids wont go to bed", "i just moved to a new city", "i dont have many friends here",
         "i spent too much money this month", "i have so much homework", "my laptop is so slow", "i lost my keys",
         "my {pet} died last year and i still miss him", "i think i have the flu", "i ate way too much"]
TASK = ["write a birthday message for {obj}", "make it shorter", "make it longer", "make it more formal",
        "make it funnier", "add an example", "explain it like im five", "give me three more ideas",
        "translate that into spanish", "fix the grammar", "what does this error mean", "why doesnt my loop stop",
        "how long do i boil an egg", "what should i cook tonight", "is it going to rain tomorrow",
        "how far is the moon", "what time is it in tokyo", "convert 5 miles to km", "whats 15 percent of 80",
        "can you recommend a movie", "help me plan a weekend in rome", "summarize it in one sentence",
        "rewrite it in bullet points", "how do i center a div", "what rhymes with orange",
        "give me a workout for beginners", "how do i ask for a raise", "what should i get {obj} for christmas"]
ANSWER = ["yes", "no", "yes please", "no thanks", "maybe", "sure", "ok", "okay", "fine", "nope", "yep", "yeah",
          "i think so", "not really", "sort of", "kind of", "probably", "definitely", "absolutely", "not yet",
          "both", "neither", "either is fine", "{color}", "{color} please", "{thing}", "i prefer {thing}",
          "the {color} one", "i like {color}", "{color} or {color}", "{n}", "about {n}", "around {n} people",
          "{n} years", "{n} dollars", "in {n} minutes", "at {n} pm", "for {n} days", "tomorrow", "next week",
          "on friday", "this morning", "never", "always", "sometimes", "in the kitchen", "at home", "online"]
ASKS = ["what", "why", "how", "who", "where", "when", "which one", "really", "huh", "what do you mean",
        "what does that mean", "how so", "like what", "such as", "are you sure", "is that right", "is that true",
        "can you say that again", "could you repeat that", "come again", "wait what", "sorry what",
        "what about {thing}", "and {thing}", "why not", "how come", "then what", "what else", "anything else",
        "is it safe", "is it expensive", "is it far", "does it hurt", "does that work", "did it work",
        "who are you", "what are you", "are you a bot", "are you there", "can you hear me", "what can you do",
        "what did i just say", "what was my first question", "what did you say before",
        "did {pron} call you back", "did {pron} reply", "what did {pron} say", "why did {pron} do that",
        "is {pron} okay", "should i text {obj}", "should i call {obj}", "did you message {obj} yet",
        "do you think {pron} is mad at me", "what should i tell {obj}", "how do i say sorry to {obj}"]
REACT = ["thanks", "thank you", "thanks a lot", "thank you so much", "got it", "makes sense", "perfect",
         "that works", "great, thank you", "cool", "nice", "awesome", "lol", "haha", "haha thats funny", "wow",
         "oh no", "oh ok", "i see", "interesting", "good point", "fair enough", "you are right", "youre right",
         "you were right", "you're right, my mistake", "my bad", "sorry, i meant {thing}", "never mind", "nvm",
         "forget it", "ignore that", "hold on", "one sec", "brb", "good morning", "good night", "hi", "hello",
         "hey there", "bye", "see you tomorrow", "that helped a lot", "love it", "not bad", "close enough",
         "thats not what i asked", "you already said that", "thats wrong", "no, you misunderstood me",
         "try again", "it still doesnt work", "that makes no sense", "youre not listening", "too long",
         "can you be shorter", "stop repeating yourself", "you got it wrong again", "that was useless",
         "ugh", "seriously?", "come on", "whatever", "i give up", "nevermind, i figured it out"]
SAY = ["i feel {feel}", "i feel {feel} today", "im {feel}", "im feeling {feel}", "i am {feel} now", "feeling {feel}",
       "honestly im {feel}", "{daily}", "{daily} lol", "{daily}, any advice", "ugh {daily}", "so {daily}",
       "{pron} left early", "{pron} didnt answer", "{pron} is coming over tonight", "{pron} said no",
       "{pron} was late again", "{pron} forgot my birthday", "{pron} got a new job", "i talked to {obj} today",
       "i miss {obj}", "i think {thing} is better", "i love {thing}", "i hate {chore}", "{chore} is the worst",
       "i like the {color} one better", "my favourite colour is {color}", "i have a {color} {pet}",
       "i see nothing wrong with {thing}", "i dont think anything is wrong with {thing}", "i hope i dont catch {ill}",
       "i think i have {ill}", "is {ill} contagious", "how do i avoid {ill}",
       "i dont know", "no idea", "im not sure what you mean", "i dont get it", "that is not what i meant",
       "do it", "go ahead", "stop", "wait", "keep going", "go on", "again", "once more", "next", "continue"]
CHORE = ["mondays", "doing the dishes", "laundry", "traffic", "waking up early", "cold coffee", "mosquitoes",
         "my commute", "spam calls", "folding clothes", "rainy weekends", "waiting in line", "cilantro"]
ILL = ["diarrhea", "the flu", "a cold", "food poisoning", "covid", "a sunburn", "a headache", "sick", "a rash"]
ASSIST = [
    "im not sure i understand. could you tell me more about {thing}",
    "sorry about that! here is a shorter version",
    "youre right, i made a mistake. the correct answer is {n}",
    "good question. it depends on a few things, mainly your budget and how much time you have",
    "happy to help. first, preheat the oven. then mix the dry ingredients and add the eggs one at a time",
    "i dont have access to your messages, so i cant see what {pron} wrote",
    "that sounds stressful. it might help to write down what is worrying you and take it one step at a time",
    "im sorry to hear that. how are you feeling now",
    "i can help with that. what is the occasion, and how long should it be",
    "sure. here are three ideas: a picnic in the park, a board game night, or a cooking class",
    "i think you mean {thing}. is that right",
    "the {color} one would go well with a grey jacket",
    "no problem! let me know if you want me to change anything",
    "sorry, i didnt catch that. could you say it another way",
    "i cant check the weather right now, but your local forecast will have it",
    "it looks like the error comes from a missing closing bracket on line {n}",
    "you could text {obj} first and ask how the day went",
    "here is the corrected sentence. i changed two commas and one verb",
    "i am an ai assistant. i can answer questions, write and explain things",
    "that is a common mistake, and it is easy to fix",
    "yes, that should work. try it and tell me what happens",
    "no, that is not quite right. {n} is the answer, because you add the two totals first",
    "i understand. lets try a different approach",
    "of course. which part would you like me to explain again",
    "great choice! rome is lovely in spring, and three days is enough for the main sights",
    "most colds get better on their own within a week. rest and drink plenty of water",
    "if the pain is severe or lasts more than a few days, please see a doctor",
    "you asked what {pron} meant. it is hard to say without more context",
    "i have no memory of earlier chats, only of this conversation",
    "sure, here is the list in bullet points",
]

# an assistant's longer answers, per topic: they address "you" and give orders ("make sure", "try", "avoid") as
# the offensive tweets of the annotated data do, and a harassment head read them as insults the longer they were
TOPICS = [
    ["a pension plan through your employer often comes with a matching contribution", "take the full match first",
     "a savings account with a higher rate is fine for short term goals", "fees matter more than most people think",
     "if you are unsure, a fee only adviser can look at your situation", "check the yearly contribution limit",
     "an index fund keeps your costs low", "try to keep three to six months of expenses as an emergency fund",
     "pay off the card with the highest interest rate first", "a budget only works if you track what you spend"],
    ["let the dough rise somewhere warm", "knead until the dough is smooth and springs back",
     "if your cake sinks, the oven may be opening too early", "weigh your flour instead of using cups",
     "a hot oven and a covered pot give a better crust", "let the loaf cool for an hour before you cut it",
     "salt the pasta water well", "rest the meat for a few minutes before slicing",
     "add the garlic late so it does not burn", "taste as you go and adjust the seasoning"],
    ["learn one language well before you add another", "small projects teach more than long tutorials",
     "the error means a variable is used before it is assigned", "you are missing a closing bracket on that line",
     "run the tests again after each change", "print the value inside the loop to see what happens",
     "use a virtual environment for each project", "read the traceback from the bottom up",
     "commit your work before you try a big change", "that function returns nothing, so the result is none"],
    ["puppies need short walks several times a day", "reward the behaviour you want right away",
     "keep training sessions to five minutes", "a crate can help with house training",
     "if your cat stops eating for more than a day, call a vet", "a tired dog is a calm dog",
     "brush your dog's teeth a few times a week", "older dogs often sleep more, which is normal"],
    ["rome is lovely in spring", "three days is enough for the main sights", "book the museum tickets in advance",
     "the trains are the easiest way to get between cities", "pack layers, because the evenings can be cool",
     "carry a copy of your passport", "check whether you need a visa before you book",
     "try to arrive a day early if you have a connection", "local buses are cheap but slow"],
    ["most colds get better on their own within a week", "rest and drink plenty of water",
     "if the fever lasts more than three days, see a doctor", "a sprain usually heals with rest, ice and elevation",
     "stretch gently after your run", "aim for seven to nine hours of sleep",
     "talk to your pharmacist before mixing medicines", "drink water before you feel thirsty on a hike"],
    ["start your cover letter with the role you are applying for", "keep your resume to one page if you can",
     "use numbers to show what you achieved", "practise your answers out loud before the interview",
     "send a short thank you note after the interview", "ask about the next steps at the end",
     "research the company's recent news", "it is fine to ask for a day to think about an offer"],
    ["it sounds like you have had a hard week", "it is normal to feel nervous before a big change",
     "talking to a friend you trust can help", "try to take one small step today",
     "you do not have to sort everything out at once", "if it keeps weighing on you, a counsellor can help",
     "be kind to yourself while you adjust", "it is okay to say no to extra plans this week"],
    ["the french revolution began in 1789", "the war ended with a treaty in the following spring",
     "historians still debate its causes", "the empire split into two halves", "trade along the river made the city rich",
     "the printing press spread ideas much faster", "the old capital was moved inland for safety"],
    ["water the tomatoes at the base, not on the leaves", "most herbs like full sun", "add compost in the autumn",
     "pinch off the side shoots as the plant grows", "a layer of mulch keeps the soil moist",
     "plant garlic in the fall for a summer harvest", "check the leaves for aphids every week"],
    ["your essay needs a clearer thesis in the first paragraph", "each paragraph should make one point",
     "cut the words you do not need", "read it aloud to catch awkward sentences", "cite your sources at the end",
     "the second paragraph repeats the first, so you could merge them", "end with what the reader should take away"],
    ["to reset the router, hold the button for ten seconds", "restart your phone and try again",
     "check that the cable is plugged in firmly", "update the app to the latest version",
     "clear the cache in the browser settings", "you may need to sign out and back in", "a password manager can help"],
]
# what small assistants say around an answer, addressing "you" again and again
BOILER = ["i'm here to help you with whatever you need", "it's okay to take your time", "whether it's {a}, {b} or {c}, i'm here to assist you",
          "i'm not a {pro}, but i can offer some general advice", "i'm just a chatbot, so please check with a {pro}",
          "if you have any other questions, feel free to ask", "i'm sorry to hear that you're going through this",
          "i'm not here to judge, only to help", "i hope this helps you with your {a}",
          "you're not alone in feeling this way", "don't hesitate to reach out if you need anything else",
          "i understand how you feel", "whatever problem you're facing, we can work through it together",
          "you've got this", "let me know what you think", "i'm always happy to help you",
          "feel free to tell me more about your situation", "it's completely normal to feel that way"]
BOILER_SLOTS = {"a": ["a personal project", "a school assignment", "a business idea", "a recipe", "a trip",
                      "your studies", "your garden", "your new job", "a story", "your budget"],
                "b": ["a question about health", "a coding problem", "a letter", "a plan for the weekend",
                      "a difficult conversation"],
                "c": ["anything else on your mind", "just a chat", "a tricky decision", "something you're curious about"],
                "pro": ["doctor", "lawyer", "therapist", "financial adviser", "vet", "nutritionist"]}
OPEN = ["", "", "sure.", "good question.", "happy to help.", 
        "here is what i would suggest.", "great question!", "of course.", "i see.", "got it.", "that makes sense."]
CLOSE = ["", "", "", "let me know if you want more detail.", "does that help?", "want me to go into more depth?",
         "i hope that helps.", "tell me how it goes.", "shall i make a checklist?"]


def answers(seed: int = 0, n: int = 900) -> list[str]:
    """Assistant answers of two to five sentences on everyday topics (benign). They train only the harassment
    heads (see synth.labelled): as benign text for every head they also lowered the other heads' scores of long
    harmful texts."""
    rng = random.Random(seed + 17)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        body = rng.sample(topic, rng.randint(2, min(5, len(topic))))
        parts = [rng.choice(OPEN)] + [b[:1].upper() + b[1:] + "." for b in body] + [rng.choice(CLOSE)]
        if rng.random() < 0.5:  # the boilerplate before or after the answer
            extra = _fill_slots(rng.choice(BOILER), BOILER_SLOTS, rng)
            parts.insert(0 if rng.random() < 0.5 else len(parts), extra[:1].upper() + extra[1:] + ".")
        out.append(" ".join(p for p in parts if p))
    return list(dict.fromkeys(out))


def _fill_slots(t: str, slots: dict[str, list[str]], rng: random.Random) -> str:
    for k, vals in slots.items():
        while "{" + k + "}" in t:
            t = t.replace("{" + k + "}", rng.choice(vals), 1)
    return t


def _slots() -> dict[str, list[str]]:
    return {"color": COLOR, "thing": THING, "pron": PRON, "obj": OBJ, "feel": FEEL, "pet": PET, "daily": DAILY,
            "chore": CHORE, "ill": ILL, "n": [str(i) for i in (2, 3, 4, 5, 7, 10, 12, 15, 20, 30, 42, 50, 100, 250)]}


def _styled(text: str, rng: random.Random) -> str:
    """Chat punctuation and case: a question mark on questions, sometimes a capital or a full stop."""
    r = rng.random()
    if r < 0.4:
        text = text[:1].upper() + text[1:]
    end = rng.random()
    if end < 0.35:
        text += "?" if text.split(" ", 1)[0].lower() in _QWORDS else "."
    elif end < 0.45:
        text += "!"
    return text


_QWORDS = {"what", "why", "how", "who", "where", "when", "which", "is", "are", "can", "could", "did", "do", "does",
           "should", "really", "huh", "and", "wait", "sorry", "come", "such", "like", "then", "anything"}


def examples(seed: int = 0) -> list[tuple[str, set[str]]]:
    """Benign chat turns (each with an empty category set): user turns of one to a dozen words, a few joined as
    one message, and assistant replies."""
    rng = random.Random(seed + 13)
    s = _slots()
    turns = (_many(ASKS, s, 500, rng) + _many(ANSWER, s, 350, rng) + _many(REACT, s, 200, rng)
             + _many(SAY, s, 700, rng) + _many(TASK, s, 200, rng))
    out = [_styled(t, rng) for t in turns]
    # several turns as one message ("ok thanks. what about the blue one?"), and assistant replies of one to
    # three sentences
    out += [" ".join(_styled(rng.choice(turns), rng) for _ in range(rng.randint(2, 3))) for _ in range(400)]
    replies = _many(ASSIST, s, 250, rng)
    out += [". ".join(rng.sample(replies, rng.randint(1, 3))) + "." for _ in range(500)]
    out = list(dict.fromkeys(out))
    # a turn of one or two words is a single point that thousands of harmful requests share words with ("what",
    # "you", "black"): each is given four times the weight of a longer text
    return [(t, set()) for t in out for _ in range(4 if len(t.split()) <= 2 else 1)]
