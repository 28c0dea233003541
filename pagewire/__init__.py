"""The `pagewire` command line: above both services, it imports them; they never import it."""
