from sipdrill.cli import main

main()
