# boot.py: the first file the port runs at every boot, before main.py.
# Deliberately tiny and never replaced by app updates, so that a bad update
# can always be rolled back from here.
