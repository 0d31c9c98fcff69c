from jpaged.serving.cli import main

main()
