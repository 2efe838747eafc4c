from mpfleet.cli import main

main()
