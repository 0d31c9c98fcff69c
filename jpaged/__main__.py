from jpaged.cli import main

main()
