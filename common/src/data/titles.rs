//! Title clean-up: MovieLens stores "Godfather, The (1972)"; prompts read better as
//! "The Godfather (1972)". The year is kept, as the paper does.

/// Articles that MovieLens moves behind the title ("Godfather, The").
const TRAILING_ARTICLES: &[&str] = &["The", "A", "An", "Les", "La", "Le", "L'", "Il", "Das", "Der", "Die", "El"];

/// Cleans a raw title: trims, decodes the HTML entities found in Amazon metadata, moves a
/// trailing article to the front (before any parenthesised alternative title) and appends the
/// year in parentheses when given and not already present.
pub fn clean_title(raw: &str, year: Option<&str>) -> String {
    let decoded = decode_entities(raw.trim());
    let (mut title, mut trailing_year) = split_year(&decoded);
    // An alternative title in parentheses ("Horseman on the Roof, The (Hussard sur le toit, Le)")
    // stays after the main title; the article belongs to the main one.
    let (main, alt) = match title.find(" (") {
        Some(pos) if title.ends_with(')') => (title[..pos].to_string(), title[pos..].to_string()),
        _ => (title.clone(), String::new()),
    };
    if let Some((body, article)) = main.rsplit_once(", ") {
        if TRAILING_ARTICLES.contains(&article) {
            let sep = if article.ends_with('\'') { "" } else { " " };
            title = format!("{article}{sep}{body}{alt}");
        }
    }
    if trailing_year.is_none() {
        trailing_year = year.map(str::trim).filter(|y| !y.is_empty()).map(str::to_string);
    }
    match trailing_year {
        Some(y) => format!("{title} ({y})"),
        None => title,
    }
}

/// Splits "Title (1995)" into ("Title", Some("1995")).
fn split_year(title: &str) -> (String, Option<String>) {
    if let Some(open) = title.rfind(" (") {
        let inner = &title[open + 2..];
        if let Some(year) = inner.strip_suffix(')') {
            if year.len() == 4 && year.chars().all(|c| c.is_ascii_digit()) {
                return (title[..open].trim_end().to_string(), Some(year.to_string()));
            }
        }
    }
    (title.to_string(), None)
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::clean_title;

    #[test]
    fn moves_trailing_article_and_keeps_year() {
        assert_eq!(clean_title("Godfather, The (1972)", None), "The Godfather (1972)");
        assert_eq!(clean_title("Usual Suspects, The", Some("1995")), "The Usual Suspects (1995)");
        assert_eq!(clean_title("Toy Story", Some("1995")), "Toy Story (1995)");
        assert_eq!(clean_title("Toy Story", Some("")), "Toy Story");
    }

    #[test]
    fn article_of_the_main_title_moves_before_an_alternative_title() {
        assert_eq!(
            clean_title("Horseman on the Roof, The (Hussard sur le toit, Le)", Some("1995")),
            "The Horseman on the Roof (Hussard sur le toit, Le) (1995)"
        );
        assert_eq!(clean_title("Seven (Se7en)", Some("1995")), "Seven (Se7en) (1995)");
    }

    #[test]
    fn does_not_touch_commas_that_are_not_articles() {
        assert_eq!(clean_title("Crumb, Robert (1994)", None), "Crumb, Robert (1994)");
        assert_eq!(clean_title("Ghost in the Shell, The", None), "The Ghost in the Shell");
    }

    #[test]
    fn decodes_html_entities_from_amazon_metadata() {
        assert_eq!(clean_title("Tom &amp; Jerry &quot;Deluxe&quot;", None), "Tom & Jerry \"Deluxe\"");
    }
}
