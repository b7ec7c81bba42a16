"""The generated world every step's data comes from (see README.md beside this file).

    world.py   the fictional world: entities, their facts, and the text written about them
    skills.py  skill documents (copying, counting, sums) mixed into the pretraining corpus
    corpus.py  documents in: a file the user passes, or the default generated corpus
"""
