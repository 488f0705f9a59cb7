"""A small built-in prompt set, so `hasten bench` runs with no download at all.

Larger real sets (MT-Bench, HumanEval, ShareGPT) come from PyPI packages; see DESIGN.md.
"""

BUILTIN_PROMPTS = [
    "Explain how a hash table works and when you would use one.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the French Revolution?",
    "Give me five tips for writing clear technical documentation.",
    "Write a Python function that checks whether a string is a palindrome, with comments.",
    "Describe the water cycle to a ten-year-old.",
    "Compare electric cars and petrol cars in terms of cost, maintenance and environment.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do vaccines train the immune system?",
    "Write an email asking my manager for a day off next Friday.",
    "What is the difference between a list and a tuple in Python?",
    "Plan a three-day trip to Rome with a modest budget.",
]
