from lionkd.cli import main

main()
