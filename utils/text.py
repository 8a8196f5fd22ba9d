"""Numbers in messages a person reads: counts with their noun, durations at a useful precision."""


def plural(count, noun):
    """'1 picture', '3 pictures' (nouns that take an s)."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def format_duration(seconds):
    """'45 s', '12 min', '3.5 h' or '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
