from zeroseg.cli import main

main()
