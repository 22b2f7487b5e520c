//! A fixed MovieLens-100K request (20 history titles, 20 candidates) for benchmarks, warm-up
//! and tests, so that every measurement of "the ranking prompt" uses the same text.

/// The first 40 MovieLens-100K titles, article moved to the front as the data pipeline does.
pub const MOVIELENS_TITLES: [&str; 40] = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    "Four Rooms (1995)",
    "Get Shorty (1995)",
    "Copycat (1995)",
    "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
    "Twelve Monkeys (1995)",
    "Babe (1995)",
    "Dead Man Walking (1995)",
    "Richard III (1995)",
    "Seven (Se7en) (1995)",
    "The Usual Suspects (1995)",
    "Mighty Aphrodite (1995)",
    "Il Postino (1994)",
    "Mr. Holland's Opus (1995)",
    "French Twist (Gazon maudit) (1995)",
    "From Dusk Till Dawn (1996)",
    "The White Balloon (1995)",
    "Antonia's Line (1995)",
    "Angels and Insects (1995)",
    "Muppet Treasure Island (1996)",
    "Braveheart (1995)",
    "Taxi Driver (1976)",
    "Rumble in the Bronx (1995)",
    "The Birdcage (1996)",
    "The Brothers McMullen (1995)",
    "Bad Boys (1995)",
    "Apollo 13 (1995)",
    "Batman Forever (1995)",
    "Belle de jour (1967)",
    "Crimson Tide (1995)",
    "Crumb (1994)",
    "Desperado (1995)",
    "The Doom Generation (1995)",
    "Free Willy 2: The Adventure Home (1995)",
    "Mad Love (1995)",
    "Nadja (1994)",
    "The Net (1995)",
    "Strange Days (1995)",
    "To Wong Foo, Thanks for Everything! Julie Newmar (1995)",
];

/// The benchmark request: 20 history titles and 20 candidate titles.
pub fn movielens_request() -> (Vec<&'static str>, Vec<&'static str>) {
    (
        MOVIELENS_TITLES[..20].to_vec(),
        MOVIELENS_TITLES[20..].to_vec(),
    )
}
