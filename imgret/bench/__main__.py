from imgret.bench.cli import main

main()
