from appo.cli import main

main()
