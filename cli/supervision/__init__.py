"""``meshserve up``'s supervisor: a pure restart policy, unit states, and the process shell."""
