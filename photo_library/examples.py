"""Example queries for the page, made of words the library's model knows: its vocabulary's most frequent
words that name Visual Genome objects (things a photo shows), joined as its captions join them."""

from utils.genome import object_names

JOINS = ("next to", "near", "on", "with", "and")  # the first whose words the vocabulary has joins two things
NOT_THINGS = {"background", "front", "side", "top", "bottom", "part", "edge", "area", "picture", "photo", "image"}


def example_queries(vocab, count=3):
    """Up to `count` sentences ("a dog next to a bench", "a kite") whose every word is in `vocab`."""
    words = [vocab.idx2word[i] for i in range(len(vocab))]  # most frequent first
    known = set(words)
    things = [word for word in words if word.isalpha() and word in object_names() and word not in NOT_THINGS]
    article = "a " if "a" in known else ""
    join = next((words for words in JOINS if set(words.split()) <= known), None)
    examples, left = [], list(things)
    while left and len(examples) < count:
        if join and len(left) >= 2 and len(examples) < count - 1:
            examples.append(f"{article}{left[0]} {join} {article}{left[1]}")
            left = left[2:]
        else:
            examples.append(f"{article}{left[0]}")
            left = left[1:]
    return examples
