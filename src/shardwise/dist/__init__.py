"""How ranks talk: process groups, shared-memory segments, collectives that know their backward, and the
transfers that move blocks of weights between DP ranks."""
