from producers.cli.main import main

main()
